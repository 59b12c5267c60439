"""The two training objectives, behind one small interface that train.py's loop runs.

Cross-entropy (the classic recipe): every caption is a target, word by word (teacher forcing).
Self-critical (Rennie et al., 2017): the model samples K captions per image, each is rewarded with
its CIDEr-D against the image's references, and the model is pushed towards the samples that beat
a baseline (the mean of the image's other samples, or the greedy caption's reward).

An objective says how it wants its batches (`per_image`, `images_only`), computes the loss of one
Batch through the EncoderDecoder (`loss`), and reports its own figures: for the log line every
few steps (`step_record`), at each epoch's end (`epoch_record`), and in validation
(`validation_scores`). Its running totals live in a dict the trainer saves with its run state,
so that a resumed run carries on exactly.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from decoding import Decoding, beam_search, caption_guard, has_hole, sample_captions
from metrics import CiderD
from vocabulary import tokenize


class EncoderDecoder(nn.Module):
    """Encoder and decoder as one module: what training optimises and DistributedDataParallel wraps.

    `forward(inputs, decode)` makes the image embeddings of a batch (from images, or from cached
    backbone features) and returns `decode(decoder, embeddings)`: each objective decodes its own way.
    """

    def __init__(self, encoder, decoder, cached):
        super().__init__()
        self.encoder, self.decoder, self.cached = encoder, decoder, cached

    def forward(self, inputs, decode):
        return decode(self.decoder, self.encoder.embed(inputs, self.cached))


class CrossEntropy:
    """The classic loss: cross-entropy of every word of every caption, its targets optionally smoothed."""
    tag, log_name, curve = '', 'train_log.jsonl', ('loss', 'loss (cross-entropy)', 'loss.png')
    images_only = False

    def __init__(self, label_smoothing=0.0, captions_per_image=1):
        self.label_smoothing, self.per_image = label_smoothing, captions_per_image

    @staticmethod
    def word_scores(model, batch):
        """The decoder's scores of every word of the batch's captions, packed (pack_padded_sequence's order)."""
        def decode(decoder, embeddings):
            return decoder(embeddings[batch.owners], batch.captions, batch.lengths)
        return model(batch.inputs, decode)

    def loss(self, model, batch, totals):
        targets = pack_padded_sequence(batch.captions, batch.lengths, batch_first=True).data
        scores = self.word_scores(model, batch)
        return F.cross_entropy(scores.float(), targets, label_smoothing=self.label_smoothing)

    def step_record(self, mean_loss, totals):
        return {'loss': mean_loss, 'perplexity': math.exp(mean_loss)}

    def epoch_record(self, totals):
        return {}

    @torch.inference_mode()
    def validation_scores(self, model, batches, device):
        """The cross-entropy per word over every validation caption (Batches with captions)."""
        total, count = 0.0, 0
        for batch in batches:
            if batch is not None:
                batch = batch.to(device)
                targets = pack_padded_sequence(batch.captions, batch.lengths, batch_first=True).data
                total += F.cross_entropy(self.word_scores(model, batch), targets, reduction='sum').item()
                count += targets.numel()
        return {'val_loss': total / max(count, 1)}


class SelfCritical:
    """Self-critical sequence training: -(reward - baseline) * log p of each sampled caption's words.

    Captions are sampled under the rules captions are decoded with (decoding.caption_guard with the
    default Decoding), and rewarded with CIDEr-D against the training references, <end> counted as
    a word so that a caption cut off mid-phrase earns less. The document frequencies are those of
    every training reference.
    """
    tag, log_name, curve = 'scst-', 'scst_log.jsonl', ('reward', 'mean reward (CIDEr-D)', 'scst_reward.png')
    images_only = True

    def __init__(self, vocab, references, samples=5, baseline='mean'):
        """`references`: {image_id: [caption, ...]} of the training set."""
        self.vocab, self.per_image, self.baseline = vocab, samples, baseline
        self.cider = CiderD({i: [tokenize(c) + ['<end>'] for c in captions] for i, captions in references.items()})
        self.guard = caption_guard(vocab, Decoding())
        self.end_id, self.max_length = vocab('<end>'), Decoding.max_length

    def loss(self, model, batch, totals):
        k = self.per_image

        def decode(decoder, embeddings):
            samples = sample_captions(decoder, embeddings.repeat_interleave(k, 0), self.end_id, self.max_length,
                                      self.guard)
            return samples, self.greedy(decoder, embeddings) if self.baseline == 'greedy' else None
        samples, greedy = model(batch.inputs, decode)
        rewards = self.rewards([i for i in batch.image_ids for _ in range(k)], samples.words.cpu(), totals)
        if greedy is not None:
            baseline = self.rewards(batch.image_ids, greedy.cpu()).repeat_interleave(k)
        else:
            by_image = rewards.view(-1, k)
            baseline = ((by_image.sum(1, keepdim=True) - by_image) / (k - 1)).view(-1)
        advantage = (rewards - baseline).to(samples.log_probs.device)
        return -(advantage[:, None] * samples.log_probs * samples.mask).sum() / samples.mask.sum()

    def greedy(self, decoder, embeddings):
        """The greedy captions (word ids) of the images, under the same rules, without dropout."""
        decoder.eval()
        best = beam_search(decoder, embeddings.detach(), self.end_id, 1, self.max_length, guard=self.guard).best
        decoder.train()
        return best

    def rewards(self, image_ids, ids, totals=None):
        """CIDEr-D of each caption (word ids) against its image's references, <end> counted as a word;
        counted into `totals` (captions sampled, their summed reward, how many had a hole) when given."""
        captions = []
        for row in ids.tolist():
            words = self.vocab.words(row)
            captions.append(words + ['<end>'] if self.end_id in row else words)
        rewards = torch.tensor([self.cider.score(i, c) for i, c in zip(image_ids, captions)])
        if totals is not None:
            totals['sampled'] = totals.get('sampled', 0) + len(captions)
            totals['reward'] = totals.get('reward', 0.0) + rewards.sum().item()
            totals['holes'] = totals.get('holes', 0) + sum(has_hole(c[:-1] if c[-1:] == ['<end>'] else c)
                                                           for c in captions)
        return rewards

    def step_record(self, mean_loss, totals):
        return {'loss': mean_loss, 'reward': totals.get('reward', 0.0) / max(1, totals.get('sampled', 0))}

    def epoch_record(self, totals):
        sampled = max(1, totals.get('sampled', 0))
        return {'mean_reward': totals.get('reward', 0.0) / sampled, 'hole_rate': totals.get('holes', 0) / sampled}

    def validation_scores(self, model, batches, device):
        return {}  # self-critical training does not optimise the validation loss
