"""The bit-floor zoo: common mobile architectures with fixed random weights, built in the bench.

Each `build_<name>()` is a manifest model entry (`source: python`): (module, example inputs).
No downloads; BatchNorm statistics are non-trivial so that folding them is exercised.
"""
import torch
import torch.nn.functional as F
from torch import nn


def bn(c):
    b = nn.BatchNorm2d(c)
    # non-trivial BN statistics so folding is exercised
    with torch.no_grad():
        b.weight.uniform_(0.5, 1.5); b.bias.uniform_(-0.1, 0.1)
        b.running_mean.uniform_(-0.1, 0.1); b.running_var.uniform_(0.5, 1.5)
    return b


class InvRes(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hid, 1, bias=False), bn(hid), nn.ReLU6(),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), bn(hid), nn.ReLU6(),
            nn.Conv2d(hid, cout, 1, bias=False), bn(cout))

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.use_res else y


class MobileNetV2ish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), bn(32), nn.ReLU6())
        cfg = [(32, 16, 1, 1), (16, 24, 2, 6), (24, 24, 1, 6), (24, 32, 2, 6), (32, 32, 1, 6),
               (32, 64, 2, 6), (64, 64, 1, 6), (64, 96, 1, 6), (96, 160, 2, 6)]
        self.blocks = nn.Sequential(*[InvRes(*c) for c in cfg])
        self.head = nn.Sequential(nn.Conv2d(160, 640, 1, bias=False), bn(640), nn.ReLU6())
        self.fc = nn.Linear(640, 100)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class MobileNetV2(nn.Module):
    """MobileNetV2 at width 1.0 (Sandler et al., 2018): 3.5M parameters, 1,000 classes. The
    MobileNetV2-style net above is its small cousin, where per-channel overheads weigh most."""
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), bn(32), nn.ReLU6())
        blocks, cin = [], 32
        for expand, cout, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                blocks.append(InvRes(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(320, 1280, 1, bias=False), bn(1280), nn.ReLU6())
        self.fc = nn.Linear(1280, 1000)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False); self.b1 = bn(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False); self.b2 = bn(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

    def forward(self, x):
        y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), bn(32), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(32, 32, 1), BasicBlock(32, 64, 2), BasicBlock(64, 64, 1),
                                    BasicBlock(64, 128, 2), BasicBlock(128, 128, 1), BasicBlock(128, 256, 2))
        self.fc = nn.Linear(256, 100)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class MTCNNish(nn.Module):  # ONet-like on 48x48 input
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.PReLU(32), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(32, 64, 3), nn.PReLU(64), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(64, 64, 3), nn.PReLU(64), nn.MaxPool2d(2, 2, ceil_mode=True),
            nn.Conv2d(64, 128, 2), nn.PReLU(128))
        self.fc = nn.Linear(128 * 3 * 3, 256)
        self.prelu = nn.PReLU(256)
        self.cls = nn.Linear(256, 2)
        self.box = nn.Linear(256, 4)

    def forward(self, x):
        x = self.prelu(self.fc(self.features(x).flatten(1)))
        return self.cls(x), self.box(x)


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1 = nn.LayerNorm(d); self.ln2 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d); self.o = nn.Linear(d, d)
        self.up = nn.Linear(d, 4 * d); self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, -1)
        q, k, v = (t.view(B, T, self.h, D // self.h).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, D))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab=1000, d=128, layers=2, T=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(T, d) * 0.02)
        self.blocks = nn.ModuleList([Block(d, 4) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, tok):
        x = self.embed(tok) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.ln(x))


class RNNClassifier(nn.Module):
    def __init__(self, kind="lstm"):
        super().__init__()
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(32, 128, batch_first=True)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])


class BiGRUTagger(nn.Module):
    """A label for every step (a keyword spotter's frame classifier, a CTC head): every step's
    output of both directions is read after the recurrence."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(32, 64, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(128, 40)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y)


class GRUSpotter(nn.Module):
    """A keyword spotter's shape: 100 frames of 40 features, a GRU of width 64, a label every frame."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(40, 64, batch_first=True)
        self.fc = nn.Linear(64, 12)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y)


def _seeded(cls, *shape, **kwargs):
    torch.manual_seed(0)
    return cls(**kwargs).eval(), (torch.randn(*shape),)


def build_mobilenetv2():
    return _seeded(MobileNetV2ish, 1, 3, 64, 64)


def build_mobilenetv2_full():
    return _seeded(MobileNetV2, 1, 3, 64, 64)


def build_resnet():
    return _seeded(ResNetish, 1, 3, 64, 64)


def build_mtcnn():
    model, example = _seeded(MTCNNish, 1, 3, 48, 48)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.PReLU):
                module.weight.uniform_(0.05, 0.4)
    return model, example


def build_tinylm():
    torch.manual_seed(0)
    return TinyLM().eval(), (torch.randint(0, 1000, (1, 32)),)


def build_lstm():
    return _seeded(RNNClassifier, 1, 20, 32, kind="lstm")


def build_gru():
    return _seeded(RNNClassifier, 1, 20, 32, kind="gru")


def build_bigru_tagger():
    return _seeded(BiGRUTagger, 1, 20, 32)


def build_gru_spotter():
    return _seeded(GRUSpotter, 1, 100, 40)
