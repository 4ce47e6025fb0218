"""AlexNet as in Caffe's models/bvlc_alexnet/deploy.prototxt: grouped conv2/4/5, LRN, 60,965,224 parameters.

Input: [N, 3, 227, 227] in BGR channel order (as Caffe), pixels in [0, 1]; the graph scales by 255 and
subtracts Caffe's ImageNet mean pixel (B 104, G 117, R 123), so the file runs without our code.
"""
from collections import OrderedDict

import torch
import torch.nn as nn

from toolchain.zoo import register_model

MEAN_BGR = (104.0, 117.0, 123.0)


class CaffeImageNormalize(nn.Module):
    """x * 255 - mean, per channel (BGR)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN_BGR).view(1, 3, 1, 1))

    def forward(self, x):
        return x * 255.0 - self.mean


@register_model("alexnet", input_shape=(3, 227, 227), dataset="imagenet")
def alexnet() -> nn.Module:
    lrn = lambda: nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)  # noqa: E731
    return nn.Sequential(OrderedDict(
        data_norm=CaffeImageNormalize(),
        conv1=nn.Conv2d(3, 96, 11, stride=4),
        relu1=nn.ReLU(),
        norm1=lrn(),
        pool1=nn.MaxPool2d(3, 2),
        conv2=nn.Conv2d(96, 256, 5, padding=2, groups=2),
        relu2=nn.ReLU(),
        norm2=lrn(),
        pool2=nn.MaxPool2d(3, 2),
        conv3=nn.Conv2d(256, 384, 3, padding=1),
        relu3=nn.ReLU(),
        conv4=nn.Conv2d(384, 384, 3, padding=1, groups=2),
        relu4=nn.ReLU(),
        conv5=nn.Conv2d(384, 256, 3, padding=1, groups=2),
        relu5=nn.ReLU(),
        pool5=nn.MaxPool2d(3, 2),
        flatten=nn.Flatten(),
        fc6=nn.Linear(9216, 4096),
        relu6=nn.ReLU(),
        drop6=nn.Dropout(0.5),
        fc7=nn.Linear(4096, 4096),
        relu7=nn.ReLU(),
        drop7=nn.Dropout(0.5),
        fc8=nn.Linear(4096, 1000),
    ))
