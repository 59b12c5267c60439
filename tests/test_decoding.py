"""The caption rules of decoding.py, on decoders whose scores are made up to break them."""
import torch

from decoding import CaptionGuard, beam_search, sample_captions


class StutterDecoder:
    """A decoder that wants to write word 3 and then say the word it just wrote again and again."""
    vocab_size = 8

    def start(self, features):
        scores = torch.full((features.size(0), self.vocab_size), -6.0)
        scores[:, 3] = 0.0
        return scores.log_softmax(1), features

    def step(self, words, state):
        scores = torch.full((words.size(0), self.vocab_size), -6.0)
        scores[torch.arange(words.size(0)), words] = 0.0  # the last word again
        scores[:, 1] = -3.0  # then <end>
        return scores.log_softmax(1), state

    @staticmethod
    def select(state, rows):
        return state[rows]


def doubled(row, end=1):
    words = row[:row.index(end)] if end in row else row
    return any(a == b for a, b in zip(words, words[1:]))


def test_no_word_twice_in_a_row_unless_repeats_are_allowed():
    features = torch.zeros(2, 1)
    for no_repeat in (2, 3):
        guard = CaptionGuard(8, no_repeat=no_repeat)
        for beam_size in (1, 3):
            best = beam_search(StutterDecoder(), features, 1, beam_size, 8, guard=guard).best.tolist()
            assert not any(doubled(row) for row in best), (no_repeat, beam_size, best)
        torch.manual_seed(0)
        drawn = sample_captions(StutterDecoder(), torch.zeros(50, 1), 1, 8, guard=guard).words.tolist()
        assert not any(doubled(row) for row in drawn), no_repeat
    classic = beam_search(StutterDecoder(), features, 1, 1, 8, guard=CaptionGuard(8, no_repeat=0)).best.tolist()
    assert classic[0] == [3] * 8  # rules off: the classic repeated word
