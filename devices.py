"""Where and in what precision models run: the device (`--device`), torchrun's processes, training's
mixed precision (`--amp`), and bfloat16 inference for the encoder (`--precision bf16`) with a
data-free bias correction.

`native_bf16` decides whether train.py --amp can use bfloat16 on a CPU. The backbone runs
under bfloat16 autocast, but for its high-resolution first layers (EncoderCNN.split_backbone),
where rounding changed the most captions and costs little to avoid. Rounding a convolution's weights to bfloat16 also shifts
the mean of its outputs; where its input is ReLU(BatchNorm(...)), that input's mean follows
from the BatchNorm's beta and gamma, so the shift is known and the next BatchNorm takes it off
(Nagel et al., 2019, "Data-Free Quantization"). bench/README.md has the figures.
"""
import functools
import os
import math
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


def add_device_flag(parser):
    """The --device flag that every script running a model has."""
    parser.add_argument('--device', default='auto', help="'auto' (CUDA, then MPS, then CPU), or e.g. cpu, cuda:1")


def pick_device(name='auto'):
    """'auto' picks CUDA, then Apple MPS, then the CPU."""
    if name != 'auto':
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device('cuda')
    if torch.backends.mps.is_available():
        return torch.device('mps')
    return torch.device('cpu')


@dataclass
class MixedPrecision:
    """How training computes: under autocast in `dtype` when enabled, with a gradient scaler (a no-op
    unless float16)."""
    device: torch.device
    enabled: bool
    dtype: torch.dtype
    scaler: torch.amp.GradScaler

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.enabled)


def mixed_precision(device, requested=None):
    """train.py --amp (None: on with CUDA, off elsewhere): bfloat16 where the device computes it, else
    float16 with a gradient scaler on CUDA; a CPU without native bfloat16 trains in float32, saying so."""
    enabled = requested if requested is not None else device.type == 'cuda'
    if enabled and device.type == 'cpu' and not native_bf16(device):
        print('warning: --amp: this CPU does not compute bfloat16 natively for every layer used (the LSTM '
              'included); training in float32', file=sys.stderr)
        enabled = False
    dtype = torch.float16 if device.type == 'cuda' and not torch.cuda.is_bf16_supported() else torch.bfloat16
    return MixedPrecision(device, enabled, dtype, torch.amp.GradScaler(enabled=enabled and dtype == torch.float16))


def init_distributed():
    """(rank, world size, local rank) under torchrun; (0, 1, 0) otherwise."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    if world == 1:
        return 0, 1, 0
    dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    return dist.get_rank(), world, int(os.environ.get('LOCAL_RANK', 0))


def native_bf16(device):
    """Whether `device` computes in bfloat16 natively: a CPU with AVX-512 bf16 or AMX on which the
    layers used here (convolution, linear, LSTM) run under bfloat16 autocast, or a CUDA GPU with
    bf16 (Ampere and later)."""
    if device.type == 'cpu':
        return (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()) and _cpu_layers_run_bf16()
    return device.type == 'cuda' and torch.cuda.is_bf16_supported(including_emulation=False)


@functools.cache
def _cpu_layers_run_bf16():
    """Run a tiny convolution, linear layer and LSTM under CPU bfloat16 autocast: oneDNN refuses
    some of them on CPUs (or oneDNN settings, ONEDNN_MAX_CPU_ISA) without the instructions."""
    try:
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            torch.nn.Conv2d(3, 4, 3)(torch.zeros(1, 3, 8, 8))
            torch.nn.Linear(4, 4)(torch.zeros(2, 4))
            torch.nn.LSTM(4, 4, batch_first=True)(torch.zeros(2, 3, 4))
            torch.nn.LSTMCell(4, 4)(torch.zeros(2, 4))
        return True
    except RuntimeError:
        return False


def activated_convs(body):
    """(BatchNorm, cap, convolution, BatchNorm) for each convolution of `body` whose input is
    ReLU (cap None) or ReLU6 (cap 6) of the first BatchNorm's output, and whose output goes into
    the second: the inner convolutions of torchvision's residual blocks and of EfficientNet-Lite's."""
    for block in body.modules():
        kind = type(block).__name__
        if kind == 'Bottleneck':
            yield from ((block.bn1, None, block.conv2, block.bn2), (block.bn2, None, block.conv3, block.bn3))
        elif kind == 'BasicBlock':
            yield block.bn1, None, block.conv2, block.bn2
        elif kind == 'MBConvBlock':
            if block._block_args.expand_ratio != 1:
                yield block._bn0, 6, block._depthwise_conv, block._bn1
            yield block._bn1, 6, block._project_conv, block._bn2


def relu_mean(mean, std, cap=None):
    """E[min(max(Z, 0), cap)] for Z ~ Normal(mean, std**2), elementwise."""
    def excess(a):  # E[max(Z - a, 0)]
        u = (mean - a) / std
        return (mean - a) * torch.special.ndtr(u) + std * torch.exp(-u * u / 2) / math.sqrt(2 * math.pi)
    return excess(0.0) - (excess(cap) if cap is not None else 0.0)


def use_bf16(encoder, device):
    """Switch `encoder` (an EncoderCNN, for inference) to bf16 where `device` has it natively;
    elsewhere warn and stay fp32. A second call changes nothing. As it changes BatchNorm
    statistics, an encoder switched to bf16 is not one to train or save."""
    if not native_bf16(device):
        print(f'warning: no native bfloat16 on this {device.type} device; using fp32', file=sys.stderr)
        return
    if encoder.bf16:
        return
    with torch.no_grad():
        for before, cap, conv, after in activated_convs(encoder.split_backbone()[1]):
            mean_in = relu_mean(before.bias, before.weight.abs().clamp_min(1e-6), cap).view(1, -1, 1, 1)
            error = (conv.weight.bfloat16().float() - conv.weight).sum((2, 3), keepdim=True)
            after.running_mean += F.conv2d(mean_in, error, groups=conv.groups).flatten()
    encoder.bf16 = True
