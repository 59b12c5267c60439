"""No <unk> holes, the hole and repeat checks, CIDEr-D, and self-critical training."""
import json
import os

import pytest
import torch

import train
from vocabulary import Vocabulary, tokenize
from captioner import Captioner
from metrics import CiderD, repeats_phrase
import objectives
from checkpoints import step_checkpoints
from decoding import CaptionGuard, Decoding, beam_search, caption_guard, has_hole, sample_captions
from conftest import TEST_DATA, assert_same_weights, final_weights, make_scenes, tiny_decoder, train_args

UNK, END = 3, 2


@pytest.mark.parametrize('kind', ['lstm', 'attention'])
def test_unk_is_never_generated_when_it_is_the_likeliest_word(kind):
    torch.manual_seed(0)
    decoder, make_features = tiny_decoder(kind, 8, 16, 12)
    features = make_features(6)
    with torch.no_grad():
        decoder.linear.bias[UNK] += 5.0  # <unk> is now the most likely word at every step
        raw = beam_search(decoder, features, END, 1, 10).best
        assert (raw == UNK).float().mean() > 0.5  # unmasked, greedy decoding is mostly <unk>
        for beam_size in (1, 3):
            ids = beam_search(decoder, features, END, beam_size, 10, guard=CaptionGuard(12, banned=(UNK,))).best
            assert ids.numel() and not (ids == UNK).any(), beam_size
        samples = sample_captions(decoder, features.repeat_interleave(20, 0), END, 10, CaptionGuard(12, banned=(UNK,)))
        drawn, log_probs, mask = samples.words, samples.log_probs, samples.mask
    assert not (drawn == UNK).any() and torch.isfinite(log_probs).all()
    assert mask[:, 0].all() and ((drawn == END).cumsum(1) <= 1).logical_or(mask == 0).all()


def test_sampling_survives_a_guard_that_leaves_only_unlikely_words():
    """Late in self-critical training a model can give the only words the guard allows a
    probability that underflows to 0; sampling still draws one of them, and the log-probability
    trained on is the guarded distribution's (here log 1, as the guard leaves one word)."""
    decoder, make_features = tiny_decoder('attention', 8, 16, 12)
    features = make_features(4)
    with torch.no_grad():
        decoder.linear.bias[END] -= 300.0  # exp(log p(<end>)) == 0 in float32
        only_end = CaptionGuard(12, banned=[w for w in range(12) if w != END])
        samples = sample_captions(decoder, features, END, 5, only_end)
        drawn, log_probs, mask = samples.words, samples.log_probs, samples.mask
    assert (drawn == END).all() and mask[:, 0].all() and torch.allclose(log_probs, torch.zeros_like(log_probs))


@pytest.mark.parametrize('kind', ['lstm', 'attention'])
def test_sampled_log_probs_and_their_gradients_are_the_models(kind):
    """Captions of many lengths: each drawn word's log-probability, and its gradient, is what the
    decoder gives that word after the caption so far; words after a caption's <end> count 0."""
    torch.manual_seed(0)
    decoder, make_features = tiny_decoder(kind, 8, 16, 12)
    features = make_features(40)
    with torch.no_grad():
        decoder.linear.bias[END] += 1.5  # captions end after a few words, at different steps
    samples = sample_captions(decoder, features, END, 10)
    words, log_probs, mask = samples.words, samples.log_probs, samples.mask
    ends = mask.sum(1).long()
    assert len(set(ends.tolist())) >= 4 and ends.max() > ends.min() + 3, ends
    assert ((words == END).float().argmax(1) == ends - 1)[ends < 10].all() and (mask[:, 0] == 1).all()
    expected, (scores, state) = [], decoder.start(features)  # the same words fed back, every row throughout
    for t in range(words.size(1)):
        expected.append(scores.gather(1, words[:, t:t + 1]).squeeze(1))
        scores, state = decoder.step(words[:, t], state)
    expected = torch.stack(expected, 1) * mask
    assert torch.allclose(log_probs, expected, atol=1e-6)
    got = torch.autograd.grad(log_probs.sum(), decoder.linear.weight)[0]
    assert torch.allclose(got, torch.autograd.grad(expected.sum(), decoder.linear.weight)[0], atol=1e-5)


@pytest.mark.parametrize('kind', ['lstm', 'attention'])
def test_self_critical_samples_are_drawn_with_dropout_and_decoding_is_not(kind):
    """In training mode the step-by-step decoder drops inputs and outputs as teacher forcing does
    (so self-critical samples are regularised alike); in eval mode decoding is deterministic."""
    torch.manual_seed(0)
    decoder, make_features = tiny_decoder(kind, 8, 16, 12, dropout=0.5)
    decoder.train()
    features = make_features(3)
    with torch.no_grad():
        first, second = decoder.start(features)[0], decoder.start(features)[0]
        assert not torch.allclose(first, second)
        decoder.eval()
        assert torch.equal(decoder.start(features)[0], decoder.start(features)[0])


GUARD_WORDS = ['<pad>', '<start>', '<end>', '<unk>', 'a', 'the', 'dog', 'runs', 'on', 'grass', 'is', '.', 'with']
# A decoder whose next word depends only on the last one (logits), built to make holes and repeats:
# "a ." and "on <end>" are its likeliest endings, and "a dog on the dog on the ..." its likeliest loop.
BIGRAMS = {'<start>': {'a': 3, '.': 2, '<end>': 2, '<unk>': 2.5}, 'a': {'.': 3, '<unk>': 2.8, 'the': 2, 'dog': 2.5},
           'dog': {'on': 3, 'runs': 2, '.': 1}, 'on': {'<end>': 3, 'the': 2.5, 'a': 2}, 'the': {'dog': 3, 'grass': 2.5},
           'runs': {'on': 3, 'with': 2}, 'grass': {'.': 3, 'with': 2}, 'is': {'on': 3}, 'with': {'a': 3, '<end>': 2.5},
           '.': {'<end>': 5}}


class BigramDecoder:
    """The decoder interface of model.py (start, step, select, attention) over a table of logits."""

    def __init__(self):
        self.table = torch.zeros(len(GUARD_WORDS), len(GUARD_WORDS))
        for word, following in BIGRAMS.items():
            for nxt, logit in following.items():
                self.table[GUARD_WORDS.index(word), GUARD_WORDS.index(nxt)] = logit

    def start(self, features):
        first = torch.full((features.size(0), len(GUARD_WORDS)), -9.0)
        first[:, 1] = 0.0  # <start>
        return first.log_softmax(1), torch.zeros(features.size(0))

    def step(self, words, state):
        return self.table[words].log_softmax(1), state

    @staticmethod
    def select(state, rows):
        return state[rows]


def test_guarded_decoding_never_makes_a_hole_or_repeats_a_phrase():
    """Unguarded, the bigram decoder's greedy, beam and sampled captions have holes, <unk> and
    repeated phrases; with the default Decoding's guard (metrics' definitions), none of them."""
    vocab = Vocabulary()
    for word in GUARD_WORDS:
        vocab.add_word(word)
    decoder, features = BigramDecoder(), torch.zeros(50, 1)
    torch.manual_seed(0)

    def captions(decoding):
        guard = caption_guard(vocab, decoding)
        found = [beam_search(decoder, features[:1], 2, beam_size, 12, guard=guard) for beam_size in (1, 3)]
        found = [beams.best for beams in found] + [sample_captions(decoder, features, 2, 12, guard).words]
        return [[vocab.words(row) for row in ids.tolist()] for ids in found]
    raw = captions(Decoding(allow_unk=True, allow_holes=True, no_repeat=0))
    assert raw[0] == [['a', '.']] and raw[1] == [['.']]  # both holes
    assert sum(map(has_hole, raw[2])) > 10 and any('<unk>' in w for w in raw[2])
    assert any(repeats_phrase(w) for w in raw[2])
    guarded = captions(Decoding())
    for name, words in zip(('greedy', 'beam 3', 'sampled'), guarded):
        assert not any(has_hole(w) or repeats_phrase(w) for w in words), (name, [' '.join(w) for w in words])
    # "dog on the" may not come twice, nor "a dog on"; cut off at 12 steps, it may not stop on "the".
    assert guarded[0] == [['a', 'dog', 'on', 'the', 'dog', 'on', 'a', 'dog', 'runs', 'on', 'grass']]


def test_holes_and_repeats_are_recognised():
    holes = ['a man is sitting on a bench in front of a .', 'a dog is jumping over a', 'a dog runs with the .',
             'a girl is playing with a in a room .', 'a dog runs to the the park .', 'a man in a <unk> shirt .',
             'a dog is on top of', 'the is running .', 'two dogs play and']
    fine = ['a man is sitting on a bench in front of a building .', 'a dog runs .', 'a girl in a red shirt .',
            'a black and white dog is running through the grass']
    assert [has_hole(c.split()) for c in holes] == [True] * len(holes)
    assert [has_hole(c.split()) for c in fine] == [False] * len(fine)
    assert repeats_phrase('a black dog is standing in front of a black dog .'.split())
    assert repeats_phrase('a race car in a race car'.split())
    assert not repeats_phrase('a dog and a cat play with a ball .'.split())


def test_cider_d_equals_pycocoevalcap_on_real_captions():
    """pycocoevalcap's Cider scorer computes CIDEr-D (clipped counts, length penalty sigma 6) with
    document frequencies from the references it scores; given the same references, ours must give
    the same score for every image (to 1e-9)."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer
    data = json.load(open(os.path.join(TEST_DATA, 'captions.json')))
    references = {}
    for ann in data['annotations']:
        references.setdefault(ann['image_id'], []).append(ann['caption'].lower().replace('.', ' ').split())
    ids = sorted(references)
    # Candidates: a shortened reference of the image itself, or of the next image (a wrong caption).
    candidates = {i: references[ids[(k + k % 2) % len(ids)]][k % 5][:4 + k] for k, i in enumerate(ids)}
    scorer = CiderScorer(n=4, sigma=6.0)
    for i in ids:
        scorer += (' '.join(candidates[i]), [' '.join(r) for r in references[i]])
    _, theirs = scorer.compute_score()
    ours = CiderD(references)
    assert [ours.score(i, candidates[i]) for i in ids] == pytest.approx(list(theirs), abs=1e-9)
    assert max(theirs) > 1 and min(theirs) < 0.5  # right and wrong captions both present


def scst_args(folder, model_path, *extra):
    return train_args(folder, model_path, '--scst', '--batch_size', '8', '--samples', '4', '--log_step', '1', *extra)


def test_scst_document_frequencies_come_from_all_training_references(tmp_path):
    folder = make_scenes(tmp_path)
    assert train.main(train_args(folder, tmp_path / 'ce', '--num_epochs', '1')) == 0
    trainer = train.Trainer(train.parse_args(scst_args(folder, tmp_path / 'scst', '--init_from',
                                                       str(tmp_path / 'ce' / 'decoder-1-2.ckpt'))))
    assert sorted(trainer.objective.cider.refs) == [1, 2, 3, 4]  # every training image, before any batch
    red = trainer.objective.cider.refs[1]
    assert len(red) == 2  # both of its captions, <end> counted as a word
    assert trainer.objective.cider.df[('a',)] == 3 and trainer.objective.cider.df[('<end>',)] == 4 and trainer.objective.cider.df[('red',)] == 1
    df = dict(trainer.objective.cider.df)
    assert trainer.train() == 0
    assert trainer.objective.cider.df == df


def test_scst_starts_from_an_exported_model(tmp_path):
    """--init_from accepts export_model.py's decoder.ckpt (float16 weights, loaded as float32)."""
    import export_model
    folder = make_scenes(tmp_path)
    assert train.main(train_args(folder, tmp_path / 'ce', '--num_epochs', '1')) == 0
    assert export_model.main(['--encoder_path', str(tmp_path / 'ce' / 'encoder-1-2.ckpt'), '--decoder_path',
                              str(tmp_path / 'ce' / 'decoder-1-2.ckpt'), '--vocab_path', str(folder / 'vocab.pkl'),
                              '--output_dir', str(tmp_path / 'exported')]) in (0, None)
    exported = torch.load(tmp_path / 'exported' / 'decoder.ckpt', weights_only=True)['model']
    trainer = train.Trainer(train.parse_args(scst_args(folder, tmp_path / 'scst', '--init_from',
                                                       str(tmp_path / 'exported' / 'decoder.ckpt'))))
    for name, weights in trainer.decoder.state_dict().items():
        assert weights.dtype == torch.float32 and torch.equal(weights, exported[name].float()), name
    assert trainer.train() == 0


def test_scst_checkpoints_resume_exactly_and_never_mix_with_cross_entropy_ones(tmp_path, capsys):
    folder = make_scenes(tmp_path)
    assert train.main(train_args(folder, tmp_path / 'm', '--num_epochs', '1')) == 0
    start = str(tmp_path / 'm' / 'decoder-1-2.ckpt')
    assert train.main(scst_args(folder, tmp_path / 'whole', '--init_from', start, '--num_epochs', '3')) == 0
    assert train.main(scst_args(folder, tmp_path / 'm', '--init_from', start, '--num_epochs', '1')) == 0
    assert train.main(scst_args(folder, tmp_path / 'm', '--init_from', start, '--num_epochs', '3',
                                '--resume', 'latest')) == 0
    assert 'decoder-scst-1-2.ckpt (epoch 2, step 0 done)' in capsys.readouterr().err
    for name in ('decoder-scst-3-2.ckpt', 'encoder-scst-3-2.ckpt'):
        assert_same_weights(final_weights(tmp_path / 'whole', name), final_weights(tmp_path / 'm', name))
    assert [os.path.basename(p) for p in step_checkpoints(str(tmp_path / 'm'))] == ['decoder-1-2.ckpt']
    assert [os.path.basename(p) for p in step_checkpoints(str(tmp_path / 'm'), 'scst-')] == [
        'decoder-scst-1-2.ckpt', 'decoder-scst-2-2.ckpt', 'decoder-scst-3-2.ckpt']
    log = [json.loads(line) for line in open(tmp_path / 'm' / 'scst_log.jsonl')]
    epochs = [r for r in log if 'mean_reward' in r]
    assert [r['epoch'] for r in epochs] == [1, 2, 3] and all(0 <= r['hole_rate'] <= 1 for r in epochs)
    assert (tmp_path / 'm' / 'train_log.jsonl').exists()  # the cross-entropy log is kept


def greedy_cider_d(model_dir, name, cache, vocab_path, references):
    """Mean CIDEr-D of the greedy captions of the cached training images."""
    from data_loader import FeatureDataset
    captioner = Captioner.load(str(model_dir / f'encoder-{name}.ckpt'), str(model_dir / f'decoder-{name}.ckpt'),
                               vocab_path, 'cpu')
    dataset = FeatureDataset(str(cache), os.path.join(TEST_DATA, 'captions.json'), captioner.vocab)
    rows = {image_id: key for key, _, image_id in dataset.samples}
    ids = sorted(rows)
    captions = captioner.caption_batch(torch.stack([dataset.load_input(rows[i]) for i in ids]), cached=True)
    cider = CiderD(references)
    return sum(cider.score(i, c.split()) for i, c in zip(ids, captions)) / len(ids)


def test_self_critical_training_raises_cider_d_more_than_cross_entropy(tmp_path):
    """From the same converged cross-entropy checkpoint (12 real COCO photos, 5 different captions
    each), 20 self-critical steps raise the training images' greedy CIDEr-D; 20 more
    cross-entropy steps at the same learning rate do not raise it as much."""
    import build_vocab
    import extract_features
    captions = os.path.join(TEST_DATA, 'captions.json')
    vocab = str(tmp_path / 'vocab.pkl')
    build_vocab.main(['--caption_path', captions, '--vocab_path', vocab, '--threshold', '2'])
    extract_features.main(['--image_dir', os.path.join(TEST_DATA, 'images'), '--caption_path', captions,
                           '--output_dir', str(tmp_path / 'cache'), '--cnn', 'efficientnet-lite0', '--image_size', '96',
                           '--num_workers', '0', '--device', 'cpu'])
    common = ['--cnn', 'efficientnet-lite0', '--features', str(tmp_path / 'cache'), '--caption_path', captions,
              '--vocab_path', vocab, '--embed_size', '64', '--hidden_size', '64', '--num_workers', '0', '--device',
              'cpu', '--seed', '0', '--log_step', '10', '--batch_size', '60', '--save_step', '1000']
    assert train.main(common + ['--model_path', str(tmp_path / 'ce'), '--num_epochs', '150', '--learning_rate',
                                '0.01']) == 0
    start = str(tmp_path / 'ce' / 'decoder-150-1.ckpt')
    further = common + ['--num_epochs', '20', '--learning_rate', '0.001', '--init_from', start]
    assert train.main(further + ['--model_path', str(tmp_path / 'more')]) == 0
    assert train.main(further + ['--model_path', str(tmp_path / 'scst'), '--scst']) == 0
    references = {}
    for ann in json.load(open(captions))['annotations']:
        references.setdefault(ann['image_id'], []).append(tokenize(ann['caption']))
    score = lambda folder, name: greedy_cider_d(tmp_path / folder, name, tmp_path / 'cache', vocab, references)
    before, cross_entropy, self_critical = score('ce', '150-1'), score('more', '20-1'), score('scst', 'scst-20-1')
    assert self_critical > before + 0.1 and self_critical > cross_entropy + 0.1, (before, cross_entropy, self_critical)


@pytest.mark.parametrize('baseline', ['mean', 'greedy'])
def test_the_advantage_is_reward_minus_baseline(tmp_path, baseline):
    """When every sample of an image (and its greedy caption) earns the same reward, its own image's
    (rewards differ between the images of a batch), nothing is better than the baseline: the loss
    and every gradient are zero."""
    folder = make_scenes(tmp_path)
    trainer = train.Trainer(train.parse_args(scst_args(folder, tmp_path / 'm', '--baseline', baseline,
                                                       '--dropout', '0.3')))
    trainer.objective.rewards = lambda image_ids, ids, totals=None: torch.tensor([0.5 * i for i in image_ids])
    trainer.model.train()
    batch = next(iter(trainer.loader))
    assert len(set(batch.image_ids)) == 2  # two photos of a batch, with different rewards
    loss = trainer.objective.loss(trainer.ddp, batch, trainer.state.totals)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in trainer.params)


def test_end_counts_in_the_reward_as_a_word(tmp_path):
    """A caption that ends scores as its words plus <end> against references that end in <end>;
    the same words cut off without <end> score lower."""
    folder = make_scenes(tmp_path)
    trainer = train.Trainer(train.parse_args(scst_args(folder, tmp_path / 'm')))
    vocab = trainer.vocab
    words = 'a red square on a white wall'.split()
    ended = [vocab('<start>')] + [vocab(w) for w in words] + [vocab('<end>'), vocab('<end>')]
    cut = [vocab('<start>')] + [vocab(w) for w in words] + [vocab('on'), vocab('a')]
    rewards = trainer.objective.rewards([1, 1], torch.tensor([ended, cut]))
    references = {i: [tokenize(c) + ['<end>'] for c in captions] for i, captions in
                  {1: ['a red square on a white wall'] * 2, 2: ['two blue birds in the sky'] * 2,
                   3: ['a green field with a tree'] * 2, 4: ['a yellow taxi on the road'] * 2}.items()}
    expected = CiderD(references)
    assert rewards[0].item() == pytest.approx(expected.score(1, words + ['<end>']))
    assert rewards[1].item() == pytest.approx(expected.score(1, words + ['on', 'a']))
    assert rewards[1] < rewards[0] and rewards[0].item() > 5


def test_self_critical_samples_are_drawn_under_the_decoding_rules(tmp_path, monkeypatch):
    """The captions self-critical training samples obey the rules captions are decoded with: no
    <unk>, no hole, no 3-word phrase twice (the guard of the default Decoding)."""
    folder = make_scenes(tmp_path)
    trainer = train.Trainer(train.parse_args(scst_args(folder, tmp_path / 'm')))
    drawn = []
    real_sample = objectives.sample_captions

    def spy(decoder, features, end_id, max_length, guard):
        drawn.append(guard)
        return real_sample(decoder, features, end_id, max_length, guard)
    monkeypatch.setattr(objectives, 'sample_captions', spy)
    trainer.objective.loss(trainer.ddp, next(iter(trainer.loader)), trainer.state.totals)
    expected = caption_guard(trainer.vocab, Decoding())
    vocab, guard = trainer.vocab, drawn[0]
    history = torch.tensor([[vocab('<start>'), vocab('a'), vocab('red'), vocab('square'), vocab('a'), vocab('red')]])
    for words in (None, history, history[:, :2]):
        got, want = (g(torch.zeros(1, len(vocab)), words).isinf() for g in (guard, expected))
        assert torch.equal(got, want)
    assert got[0, vocab('<unk>')] and got[0, vocab('.')]  # after "a": no full stop; never <unk>
    assert guard(torch.zeros(1, len(vocab)), history)[0, vocab('square')].isinf()  # "a red square" twice
