"""Caption metrics: the standard COCO scores (pycocoevalcap's own scorers), CIDEr-D, and the check
for a fault a reader notices first, a repeated phrase (holes are decoding.has_hole: the rule)."""
import contextlib
import io
import math
import os
import shutil
import sys

from vocabulary import tokenize

METRICS = ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE')
# What pycocoevalcap's PTB tokenizer drops after tokenising.
PUNCTUATION = {"''", "'", '``', '`', '-LRB-', '-RRB-', '-LCB-', '-RCB-', '.', '?', '!', ',', ':', '-', '--',
               '...', ';', '(', ')', '[', ']', '{', '}'}


def tokenize_for_scoring(captions):
    """{id: [caption]} -> {id: [tokenised caption]}: the PTB tokenizer, or its Python stand-in without Java."""
    if shutil.which('java'):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        return PTBTokenizer().tokenize({k: [{'caption': c} for c in v] for k, v in captions.items()})
    return {k: [' '.join(w for w in tokenize(c) if w not in PUNCTUATION) for c in v] for k, v in captions.items()}


def _spice_ready():
    """SPICE downloads Stanford CoreNLP on first use; only run it when that is already done."""
    import pycocoevalcap.spice as spice
    return os.path.exists(os.path.join(os.path.dirname(spice.__file__), 'lib', 'stanford-corenlp-3.6.0.jar'))


def score(references, predictions, metrics=METRICS):
    """Score {image_id: caption} against {image_id: [reference captions]} with pycocoevalcap's scorers.

    Only images with both a prediction and references are scored. Returns {metric: value};
    messages (and the scorers' own progress output) go to stderr.
    """
    log = sys.stderr
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    ids = [i for i in predictions if i in references]
    java = shutil.which('java') is not None
    if not java:
        print('java not found: the PTB tokenizer is approximated in Python; METEOR and SPICE skipped '
              '(install a Java runtime for the official figures)', file=log)
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers' debug prints ({'testlen': ...}, ratio) are dropped
        gts = tokenize_for_scoring({i: references[i] for i in ids})
        res = tokenize_for_scoring({i: [predictions[i]] for i in ids})
        scores = {}
        if any(m.startswith('Bleu') for m in metrics):
            bleu, _ = Bleu(4).compute_score(gts, res)
            scores.update({f'Bleu_{n}': bleu[n - 1] for n in range(1, 5)})
        if 'METEOR' in metrics and java:
            from pycocoevalcap.meteor.meteor import Meteor
            scores['METEOR'], _ = Meteor().compute_score(gts, res)
        if 'ROUGE_L' in metrics:
            scores['ROUGE_L'], _ = Rouge().compute_score(gts, res)
        if 'CIDEr' in metrics:
            scores['CIDEr'], _ = Cider().compute_score(gts, res)
        if 'SPICE' in metrics and java:
            if not _spice_ready():
                print('SPICE skipped: its Stanford CoreNLP models are not installed', file=log)
            else:
                try:
                    from pycocoevalcap.spice.spice import Spice
                    scores['SPICE'], _ = Spice().compute_score(gts, res)
                except Exception as e:  # noqa: BLE001 -- SPICE's Java side fails in many ways; skip it then
                    print(f'SPICE skipped: it failed ({type(e).__name__}: {e})', file=log)
    return {k: float(scores[k]) for k in METRICS if k in scores}


def bootstrap_intervals(references, predictions, samples=1000, seed=0):
    """95% intervals over images (the 2.5th and 97.5th percentiles over `samples` resamples of the
    scored images, drawn with replacement): BLEU-4 and METEOR (with Java) recomputed on every
    resample by pycocoevalcap's scorers (METEOR's jar aggregates each caption's statistics, computed
    once); CIDEr as the mean of its per-image scores on the resample (its document frequencies those
    of all the images). Returns {metric: (low, high)}."""
    import random
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    ids = [i for i in predictions if i in references]
    with contextlib.redirect_stdout(io.StringIO()):
        gts = tokenize_for_scoring({i: references[i] for i in ids})
        res = tokenize_for_scoring({i: [predictions[i]] for i in ids})
        cider = dict(zip(ids, Cider().compute_score(gts, res)[1]))
        meteor = _MeteorResampler(gts, res) if shutil.which('java') else None
        draws = {'Bleu_4': [], 'CIDEr': [], 'METEOR': []}
        rng = random.Random(seed)
        for _ in range(samples):
            chosen = [rng.choice(ids) for _ in ids]
            gts_r, res_r = {k: gts[i] for k, i in enumerate(chosen)}, {k: res[i] for k, i in enumerate(chosen)}
            draws['Bleu_4'].append(Bleu(4).compute_score(gts_r, res_r, verbose=0)[0][3])
            draws['CIDEr'].append(sum(float(cider[i]) for i in chosen) / len(chosen))
            if meteor:
                draws['METEOR'].append(meteor.score(chosen))

    def percentile(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]
    return {name: (percentile(values, 0.025), percentile(values, 0.975)) for name, values in draws.items() if values}


class _MeteorResampler:
    """METEOR of any multiset of the captions: each caption's statistics are computed once by the
    METEOR jar (pycocoevalcap 1.2's Meteor._stat), then aggregated by the jar for each resample."""

    def __init__(self, gts, res):
        from pycocoevalcap.meteor.meteor import Meteor
        self.meteor = Meteor()
        self.stats = {i: self.meteor._stat(res[i][0], gts[i]) for i in res}

    def score(self, ids):
        process = self.meteor.meteor_p
        process.stdin.write(('EVAL ||| ' + ' ||| '.join(self.stats[i] for i in ids) + '\n').encode())
        process.stdin.flush()
        for _ in ids:  # each caption's score, then the aggregate
            process.stdout.readline()
        return float(process.stdout.readline().strip())


class CiderD:
    """CIDEr-D (Vedantam et al., 2015): the self-critical reward, and greedy validation's CIDEr-D.

    Each caption is a vector of tf-idf weights of its 1- to 4-grams; a candidate scores, for each n,
    the cosine-like similarity of its vector to each reference's, with its counts clipped to the
    reference's and a Gaussian penalty (sigma 6) on the length difference; the mean over n, averaged
    over the references, times 10. This is the formula of pycocoevalcap's `Cider` scorer (which is
    CIDEr-D); that scorer takes document frequencies from the captions it is asked to score, while
    here they come once from all of `references` ({image_id: [list of words]}): for self-critical
    training, every training reference.
    """

    def __init__(self, references, n=4, sigma=6.0):
        self.n, self.sigma = n, sigma
        counts = {i: [self._ngrams(words) for words in refs] for i, refs in references.items()}
        self.df = {}
        for refs in counts.values():
            for gram in set(g for ref in refs for g in ref):
                self.df[gram] = self.df.get(gram, 0) + 1
        self.log_images = math.log(float(len(references)))
        self.refs = {i: [(*self._vector(c), len(words)) for c, words in zip(refs, references[i])]
                     for i, refs in counts.items()}

    def _ngrams(self, words):
        counts = {}
        for k in range(1, self.n + 1):
            for j in range(len(words) - k + 1):
                gram = tuple(words[j:j + k])
                counts[gram] = counts.get(gram, 0) + 1
        return counts

    def _vector(self, counts):
        """(tf-idf weights per n, their norms per n)."""
        vec, norm = [{} for _ in range(self.n)], [0.0] * self.n
        for gram, tf in counts.items():
            weight = tf * (self.log_images - math.log(max(1.0, self.df.get(gram, 0.0))))
            vec[len(gram) - 1][gram] = weight
            norm[len(gram) - 1] += weight * weight
        return vec, [math.sqrt(x) for x in norm]

    def score(self, image_id, words):
        """The CIDEr-D of one candidate (a list of words) against image_id's references."""
        vec, norm = self._vector(self._ngrams(words))
        total = 0.0
        for ref_vec, ref_norm, ref_length in self.refs[image_id]:
            penalty = math.exp(-((len(words) - ref_length) ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                if norm[k] and ref_norm[k]:
                    dot = sum(min(w, ref_vec[k][g]) * ref_vec[k][g] for g, w in vec[k].items() if g in ref_vec[k])
                    total += penalty * dot / (norm[k] * ref_norm[k])
        return total / self.n / len(self.refs[image_id]) * 10.0


def repeats_phrase(words, n=3):
    """Whether a caption repeats a phrase of n (or more) words, e.g. 'a race car in a race car'."""
    words = [w for w in words if w not in PUNCTUATION]
    grams = [tuple(words[j:j + n]) for j in range(len(words) - n + 1)]
    return len(set(grams)) < len(grams)
