"""The benchmark models: ResNet-20/18, VGG-16(-BN), ViT, and small models for the embedded datasets.

Every model is a Flax NNX module taking channel-last inputs and a ``norm=``
argument (``"batch" | "layer" | "rms" | "group" | "learnable_scaler" | "none"``).
"""

from sing_jax.nn.models._common import ConvNormAct, count_params
from sing_jax.nn.models.resnet import BasicBlock, CifarResNet, ResNet18, resnet18, resnet20
from sing_jax.nn.models.small import CNN1D, MLP, SmallCNN
from sing_jax.nn.models.vgg import VGG, VGG16_CONFIG, vgg16
from sing_jax.nn.models.vit import (
    ViT,
    attention_extra_term,
    feature_decay_term,
    learnable_scaler_aux_loss,
    reference_aux_loss_weights,
    timm_trunc_normal,
    vit,
)

__all__ = [
    "BasicBlock",
    "CNN1D",
    "CifarResNet",
    "ConvNormAct",
    "MLP",
    "ResNet18",
    "SmallCNN",
    "VGG",
    "VGG16_CONFIG",
    "ViT",
    "attention_extra_term",
    "count_params",
    "feature_decay_term",
    "learnable_scaler_aux_loss",
    "reference_aux_loss_weights",
    "resnet18",
    "resnet20",
    "timm_trunc_normal",
    "vgg16",
    "vit",
]
