"""Write tuning/suites/{resnet50,mobilenet_v2,vgg16}.json: every distinct convolution of each
model at 224x224, batch 1, with how many times the model runs it (`count`).

The layer lists follow the torchvision definitions of these models. Run it again only if the
suites' format changes: python tuning/make_model_suites.py
"""
import json
from pathlib import Path

SUITES = Path(__file__).parent / "suites"


class Model:
    def __init__(self):
        self.layers = {}

    def conv(self, cin, cout, k, size, stride=1, groups=1):
        """Add one convolution (padding k//2, as all three models use); return its output size."""
        key = (cin, cout, k, size, stride, groups)
        self.layers[key] = self.layers.get(key, 0) + 1
        return (size + 2 * (k // 2) - k) // stride + 1

    def suite(self, model, about):
        layers = []
        for (cin, cout, k, size, stride, groups), count in self.layers.items():
            kind = "dw" if groups == cin == cout else f"g{groups}_" if groups > 1 else ""
            name = f"{model}_{kind}{k}x{k}{f's{stride}' if stride > 1 else ''}_{cin}-{cout}@{size}"
            layers.append(dict(name=name, batch=1, in_channels=cin, height=size, width=size,
                               out_channels=cout, kernel_size=[k, k], stride=[stride, stride],
                               padding=[k // 2, k // 2], dilation=[1, 1], groups=groups,
                               count=count))
        return {"about": about, "layers": layers}


def resnet50():
    m = Model()
    size = m.conv(3, 64, 7, 224, stride=2) // 2        # conv1, then a 3x3/2 max-pool
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for block in range(blocks):
            s = stride if block == 0 else 1
            m.conv(cin, width, 1, size)
            out = m.conv(width, width, 3, size, stride=s)      # torchvision v1.5: stride here
            m.conv(width, width * 4, 1, out)
            if block == 0:
                m.conv(cin, width * 4, 1, size, stride=s)       # the downsample shortcut
            cin, size = width * 4, out
    return m.suite("r50", "ResNet-50 (torchvision v1.5) convolutions at 224x224, batch 1")


def mobilenet_v2():
    m = Model()
    size, cin = m.conv(3, 32, 3, 224, stride=2), 32
    for expand, cout, repeats, stride in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2),
                                          (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                                          (6, 320, 1, 1)):
        for i in range(repeats):
            hidden = cin * expand
            if expand != 1:
                m.conv(cin, hidden, 1, size)
            out = m.conv(hidden, hidden, 3, size, stride=stride if i == 0 else 1, groups=hidden)
            m.conv(hidden, cout, 1, out)
            cin, size = cout, out
    m.conv(cin, 1280, 1, size)
    return m.suite("mbv2", "MobileNetV2 (torchvision) convolutions at 224x224, batch 1")


def vgg16():
    m = Model()
    size, cin = 224, 3
    for stage in ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)):
        for cout in stage:
            m.conv(cin, cout, 3, size)
            cin = cout
        size //= 2                                          # 2x2 max-pool
    return m.suite("vgg16", "VGG-16 (torchvision) convolutions at 224x224, batch 1")


if __name__ == "__main__":
    for name, build in (("resnet50", resnet50), ("mobilenet_v2", mobilenet_v2),
                        ("vgg16", vgg16)):
        suite = build()
        (SUITES / f"{name}.json").write_text(json.dumps(suite, indent=1) + "\n")
        print(f"{name}: {len(suite['layers'])} distinct layers, "
              f"{sum(l['count'] for l in suite['layers'])} convolutions")
