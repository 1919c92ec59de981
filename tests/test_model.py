import re

import torch

from mnist_dist.model import Net, count_params, summary_table
from mnist_dist.speed import to_channels_last

# The seed's summary table: (layer, output shape without batch, parameters).
SEED_TABLE = [
    ("Conv2d-1", [8, 28, 28], 72), ("ReLU-2", [8, 28, 28], 0), ("BatchNorm2d-3", [8, 28, 28], 16),
    ("Dropout2d-4", [8, 28, 28], 0), ("Conv2d-5", [16, 28, 28], 1152), ("ReLU-6", [16, 28, 28], 0),
    ("BatchNorm2d-7", [16, 28, 28], 32), ("Dropout2d-8", [16, 28, 28], 0), ("MaxPool2d-9", [16, 14, 14], 0),
    ("Conv2d-10", [16, 14, 14], 2304), ("ReLU-11", [16, 14, 14], 0), ("BatchNorm2d-12", [16, 14, 14], 32),
    ("Dropout2d-13", [16, 14, 14], 0), ("Conv2d-14", [16, 14, 14], 2304), ("ReLU-15", [16, 14, 14], 0),
    ("BatchNorm2d-16", [16, 14, 14], 32), ("Dropout2d-17", [16, 14, 14], 0), ("MaxPool2d-18", [16, 7, 7], 0),
    ("Conv2d-19", [16, 5, 5], 2304), ("ReLU-20", [16, 5, 5], 0), ("BatchNorm2d-21", [16, 5, 5], 32),
    ("Dropout2d-22", [16, 5, 5], 0), ("Conv2d-23", [10, 3, 3], 1440), ("AdaptiveAvgPool2d-24", [10, 1, 1], 0),
]


def test_parameter_count_and_logits_shape():
    net = Net()
    assert count_params(net) == 9720
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_summary_table_matches_the_seed():
    text = summary_table(Net())
    rows = re.findall(r"^\s*(\S+-\d+)\s+\[-1, ([\d, ]+)\]\s+([\d,]+)$", text, re.M)
    got = [(name, [int(v) for v in shape.split(",")], int(params.replace(",", ""))) for name, shape, params in rows]
    assert got == SEED_TABLE
    assert "Trainable params: 9,720" in text


def test_summary_leaves_model_and_rng_untouched():
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    summary_table(net)
    assert torch.rand(1) == expected
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_channels_last_keeps_the_first_block_nchw_and_the_same_function():
    net = Net().eval()
    x = torch.randn(4, 1, 28, 28)
    expected = net(x)
    to_channels_last(net)
    outputs = []
    for layer in net.layers:
        x = layer(x)
        outputs.append(x)
    # The 8-channel block NCHW, where its BatchNorm is fast; every later activation NHWC.
    assert all(o.is_contiguous() for o in outputs[:4])
    assert all(o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous() for o in outputs[4:-1])
    torch.testing.assert_close(outputs[-1].flatten(1), expected)
