"""LeNet-300-100: 784-300-100-10 fully connected with ReLU (LeCun et al. 1998; Han et al. 2015).

Layer names follow Caffe's lenet_300_100 prototxt (ip1, ip2, ip3)."""
from collections import OrderedDict

import torch.nn as nn

from toolchain.zoo import register_model


@register_model("lenet-300-100", input_shape=(1, 28, 28), dataset="mnist")
def lenet_300_100() -> nn.Module:
    return nn.Sequential(OrderedDict(
        flatten=nn.Flatten(),
        ip1=nn.Linear(784, 300),
        relu1=nn.ReLU(),
        ip2=nn.Linear(300, 100),
        relu2=nn.ReLU(),
        ip3=nn.Linear(100, 10),
    ))
