"""Decoding: how a trained decoder turns an image into words.

The rules every generated caption obeys (no <unk>, no holes such as a caption ending in "a" or
"of", no phrase said twice), the word lists they are made of, the guard that applies them to the
decoder's scores, and the two ways of drawing words under it: beam search (greedy with one beam),
for captioning, and sampling, for self-critical training.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from errors import checked

@dataclass
class Decoding:
    """How captions are generated; kept apart from the architecture, recorded beside it."""
    beam_size: int = 1  # 1 = greedy, as the classic recipe
    length_penalty: float = 0.0  # rank finished beams by sum(log p) / length ** length_penalty
    max_length: int = 20  # most words generated
    allow_unk: bool = False  # let the model generate <unk> (masked by default)
    allow_holes: bool = False  # let a caption end in an article or preposition (has_hole)
    no_repeat: int = 3  # never repeat a phrase of this many words (0 = allow repeats)

    LIMITS = {'beam_size': (1, 1000), 'max_length': (1, 1000), 'no_repeat': (0, 1000)}  # the integers' ranges

    def __post_init__(self):
        """ValueError naming the setting for any value out of range (flags and recorded settings alike)."""
        for name, (low, high) in self.LIMITS.items():
            checked(name, getattr(self, name), low, high, integer=True)
        checked('length_penalty', self.length_penalty, 0, 10)
        for name in ('allow_unk', 'allow_holes'):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f'{name} must be true or false, not {getattr(self, name)!r}')


ARTICLES = {'a', 'an', 'the'}
BAD_ENDINGS = ARTICLES | {'of', 'in', 'on', 'with', 'at', 'to', 'and'}
PREPOSITIONS = {'of', 'in', 'on', 'with', 'at', 'to', 'by', 'for', 'from', 'into', 'onto', 'over', 'under',
                'near', 'behind', 'through', 'across', 'along', 'around', 'above', 'below', 'beside', 'between',
                'towards', 'toward', 'inside', 'outside', 'against', 'during', 'among', 'beneath', 'underneath'}

NOT_AFTER_ARTICLE = ARTICLES | PREPOSITIONS | {'is', 'are', 'and', '.'}  # "a and", "the of", "a ."


def has_hole(words):
    """Whether a caption (its words) reads broken: it holds <unk>; it ends (before its full stop, or
    cut off without one) in an article or in of/in/on/with/at/to/and; or an article is followed
    by another article, a preposition, is/are, "and" or the full stop."""
    if '<unk>' in words:
        return True
    body = words[:-1] if words and words[-1] == '.' else words
    if not body or body[-1] in BAD_ENDINGS:
        return True
    return any(w in ARTICLES and nxt in NOT_AFTER_ARTICLE for w, nxt in zip(words, words[1:]))


def caption_guard(vocab, decoding):
    """The CaptionGuard of `decoding`'s rules in `vocab`'s word ids. Unless it allows <unk>, no
    <unk>; unless it allows holes (has_hole), the caption starts with <start> and has no
    <start> or <pad> after it, does not end (<end>, or the full stop) right after <start>, an
    article or of/in/on/with/at/to/and, nor stops on one when cut off, and puts no article before
    an article, a preposition, is/are or "and" (NOT_AFTER_ARTICLE); and, unless decoding.no_repeat
    is 0, no phrase of that many words comes twice and no word twice in a row."""
    def ids(words):
        return [vocab.word2idx[w] for w in words if w in vocab.word2idx]
    holes = not decoding.allow_holes
    endings = ids(['<end>', '.'])
    after = [(ids(BAD_ENDINGS - ARTICLES) + ids(['<start>']), endings),
             (ids(ARTICLES), endings + ids(NOT_AFTER_ARTICLE))] if holes else []
    banned = ([] if decoding.allow_unk else ids(['<unk>'])) + (ids(['<start>', '<pad>']) if holes else [])
    return CaptionGuard(len(vocab), banned, after, not_last=ids(BAD_ENDINGS) if holes else [],
                        no_repeat=decoding.no_repeat, first=ids(['<start>']) if holes else [])


class CaptionGuard:
    """The words a decoder may not choose next, given each caption so far (as word ids).

    At the first step only the `first` words (when given); after it, `banned` words never; after
    a word of `after[k][0]`, none of `after[k][1]` (e.g. no full stop right after "a"); at the last
    step, none of `not_last`; and, with `no_repeat` n, no word that would repeat an n-word phrase
    already in the caption (the trigram blocking of captioning and summarisation codebases), nor
    the word just written (no "sheep sheep", which n-word blocking lets through for n > 1).
    Greedy, beam search and sampling all apply it, so the printed caption is exactly the decoded words.
    """

    def __init__(self, vocab_size, banned=(), after=(), not_last=(), no_repeat=0, first=()):
        self.kind = torch.zeros(vocab_size, dtype=torch.long)  # 0: no rule, k: the words of after[k - 1]
        self.rules = torch.zeros(len(after) + 1, vocab_size, dtype=torch.bool)  # kind -> words banned next
        self.rules[:, list(banned)] = True
        for k, (words, next_banned) in enumerate(after, 1):
            self.kind[list(words)] = k
            self.rules[k, list(next_banned)] = True
        self.first = torch.ones(vocab_size, dtype=torch.bool) if first else self.rules[0].clone()
        self.first[list(first)] = False
        self.not_last = torch.zeros(vocab_size, dtype=torch.bool)
        self.not_last[list(not_last)] = True
        self.no_repeat = no_repeat

    def __call__(self, log_probs, history, last_step=False):
        """`log_probs` (N, V) with the banned words at -inf; `history` (N, t): the words so far
        (None at the first step)."""
        device = log_probs.device
        # NaN and infinite scores (a broken model) sink below every allowed word but stay above the banned
        # ones, so no rule is ever broken, whatever the scores.
        log_probs = log_probs.nan_to_num(nan=-1e9, posinf=-1e9, neginf=-1e9)
        if self.kind.device != device:  # moved once, not at every step
            self.kind, self.rules, self.first, self.not_last = (
                t.to(device) for t in (self.kind, self.rules, self.first, self.not_last))
        if history is None:
            return log_probs.masked_fill(self.first, float('-inf'))
        banned = self.rules[self.kind[history[:, -1]]]
        if last_step:
            banned |= self.not_last
        n = self.no_repeat
        if n:  # never the same word twice in a row ("sheep sheep"), whatever n
            banned = banned.scatter(1, history[:, -1:], True)
        if n and history.size(1) >= n:
            phrases = history.unfold(1, n, 1)  # (N, t - n + 1, n): every n-word phrase so far
            ending = history[:, None, history.size(1) - (n - 1):]  # the caption's last n - 1 words (none for n = 1)
            again = (phrases[:, :, :-1] == ending).all(2)  # the phrases that begin as the caption ends
            hits = torch.zeros(banned.shape, device=device).scatter_add_(1, phrases[:, :, -1], again.float())
            banned |= hits > 0
        return log_probs.masked_fill(banned, float('-inf'))


@dataclass
class Beams:
    """What beam search found for a batch of B images with K beams."""
    words: torch.Tensor  # (B, K, steps) every hypothesis's word ids, best first
    scores: torch.Tensor  # (B, K) their ranking scores, sum(log p) / length ** length_penalty
    attention: torch.Tensor = None  # (B, steps, L) the best hypothesis's attention weights (attention decoder)

    @property
    def best(self):
        """(B, steps) the word ids of each image's best hypothesis."""
        return self.words[:, 0]


@torch.no_grad()
def beam_search(decoder, features, end_id, beam_size=1, max_length=20, length_penalty=0.0, guard=None,
                with_attention=False):
    """Batched beam search: Beams holding every hypothesis of each image, best first (and, with
    `with_attention`, the best one's attention weights). Beam size 1 is greedy decoding.

    All images and beams advance together as one batch of B*K rows. A beam that emits <end>
    is finished: it keeps its score and extends only with <end>. Search stops when every beam
    of every image is finished, or after max_length steps. Hypotheses are then ranked by
    sum(log p) / length ** length_penalty (ties keep beam order). Words that `guard` (a
    CaptionGuard) bans are never generated.
    """
    B, K = features.size(0), beam_size
    log_probs, state = decoder.start(features)  # (B, V)
    if guard:
        log_probs = guard(log_probs, None)
    vocab_size = log_probs.size(1)
    scores, tokens = log_probs.topk(min(K, vocab_size), dim=1)  # (B, K)
    if K > vocab_size:  # more beams than words: the extra ones start dead
        scores = F.pad(scores, (0, K - vocab_size), value=float('-inf'))
        tokens = F.pad(tokens, (0, K - vocab_size), value=end_id)
    images = torch.arange(B, device=features.device)
    state = decoder.select(state, images.repeat_interleave(K))  # rows ordered image-major
    history = tokens.unsqueeze(2)  # (B, K, t)
    attention = decoder.attention(state).view(B, K, 1, -1) if with_attention else None  # (B, K, t, L)
    offsets = (images * K).unsqueeze(1)
    finished = tokens == end_id
    lengths = torch.ones_like(scores)
    done_row = torch.full_like(log_probs[0], float('-inf'))  # a finished beam's one continuation,
    done_row[end_id] = 0.0  # <end>, at no cost
    for t in range(1, max_length):
        if finished.all():
            break
        log_probs, state = decoder.step(tokens.reshape(-1), state)
        if guard:
            log_probs = guard(log_probs, history.reshape(B * K, -1), last_step=t == max_length - 1)
        log_probs = torch.where(finished.unsqueeze(2), done_row, log_probs.view(B, K, vocab_size))
        scores, flat = (scores.unsqueeze(2) + log_probs).view(B, -1).topk(K, dim=1)
        parent, tokens = flat // vocab_size, flat % vocab_size
        finished = finished.gather(1, parent)
        lengths = lengths.gather(1, parent) + (~finished).float()
        history = torch.cat((history.gather(1, parent.unsqueeze(2).expand_as(history)), tokens.unsqueeze(2)), 2)
        rows = (parent + offsets).reshape(-1)
        state = decoder.select(state, rows)
        if with_attention:
            kept = attention.gather(1, parent[:, :, None, None].expand_as(attention))
            attention = torch.cat((kept, decoder.attention(state).view(B, K, 1, -1)), 2)
        finished = finished | (tokens == end_id)
    ranked = scores / lengths ** length_penalty
    order = torch.argsort(ranked, dim=1, descending=True, stable=True)
    words = history.gather(1, order.unsqueeze(2).expand_as(history))
    return Beams(words, ranked.gather(1, order), attention[images, order[:, 0]] if with_attention else None)


@dataclass
class Samples:
    """Captions drawn from a decoder, one per row of its input."""
    words: torch.Tensor  # (B, steps) word ids, <end> after each caption's first <end>
    log_probs: torch.Tensor  # (B, steps) the log-probability of each drawn word, with gradient
    mask: torch.Tensor  # (B, steps) 1.0 for the words up to and including each caption's first <end>


def sample_captions(decoder, features, end_id, max_length=20, guard=None):
    """Samples: one caption drawn from the model per row of `features` (multinomial, for
    self-critical training), never a word that `guard` bans."""
    log_probs, state = decoder.start(features)
    words, chosen, mask = [], [], []
    running = torch.ones(features.size(0), dtype=torch.bool, device=features.device)
    for t in range(max_length):
        if t:
            log_probs, state = decoder.step(words[-1], state)
        if guard:  # the policy sampled and trained is the guarded one, renormalised (and never all zeros)
            log_probs = guard(log_probs, torch.stack(words, 1) if t else None,
                              last_step=t == max_length - 1).log_softmax(-1)
        drawn = torch.multinomial(log_probs.detach().float().exp(), 1).squeeze(1)
        drawn = torch.where(running, drawn, torch.full_like(drawn, end_id))
        words.append(drawn)
        chosen.append(log_probs.gather(1, drawn.unsqueeze(1)).squeeze(1))
        mask.append(running)
        running = running & (drawn != end_id)
        if not running.any():
            break
    mask = torch.stack(mask, 1)
    return Samples(torch.stack(words, 1), torch.stack(chosen, 1).masked_fill(~mask, 0.0), mask.float())
