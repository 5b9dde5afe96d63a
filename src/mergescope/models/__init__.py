"""The model zoo: a registry of fx-traceable architectures that checkpoints can rebuild by name.

Importing this package registers: ``mlp``, ``cnn_digits``, ``vgg11``, ``vgg11_bn``, ``resnet20``,
``alexnet_cifar``, the torchvision adapters ``tv_alexnet``, ``tv_vgg11``, ``tv_vgg11_bn``, ``tv_resnet18``,
``tv_resnet50``, and the namespace ``timm:NAME`` for any timm architecture (timm imported on first use).
"""

from mergescope.models import alexnet, cnn, mlp, resnet, timm_models, torchvision_models, vgg  # noqa: F401
from mergescope.models._registry import (
    ARCH_ATTR,
    create_model,
    get_model_entry,
    list_models,
    model_config,
    register_model,
    register_namespace,
)
from mergescope.models.inputs import check_input_fits
from mergescope.models.weights import (
    apply_state_dict,
    check_state_dict,
    infer_shape_kwargs,
    load_state_dict_file,
    read_safetensors,
    strip_wrapper_prefix,
)

__all__ = [
    "ARCH_ATTR",
    "apply_state_dict",
    "check_input_fits",
    "check_state_dict",
    "create_model",
    "get_model_entry",
    "infer_shape_kwargs",
    "list_models",
    "load_state_dict_file",
    "model_config",
    "read_safetensors",
    "register_model",
    "register_namespace",
    "strip_wrapper_prefix",
]
