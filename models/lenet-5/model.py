"""LeNet-5 as in Caffe's examples/mnist/lenet.prototxt (the network Han et al. 2015 pruned).

conv 20@5x5 -> max-pool 2 -> conv 50@5x5 -> max-pool 2 -> fc 500 -> ReLU -> fc 10 (no ReLU after the convs).
"""
from collections import OrderedDict

import torch.nn as nn

from toolchain.zoo import register_model


@register_model("lenet-5", input_shape=(1, 28, 28), dataset="mnist")
def lenet_5() -> nn.Module:
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 20, 5),
        pool1=nn.MaxPool2d(2, 2),
        conv2=nn.Conv2d(20, 50, 5),
        pool2=nn.MaxPool2d(2, 2),
        flatten=nn.Flatten(),
        ip1=nn.Linear(800, 500),
        relu1=nn.ReLU(),
        ip2=nn.Linear(500, 10),
    ))
