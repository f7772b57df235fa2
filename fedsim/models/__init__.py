"""The model zoo: plain ``nn.Module`` factories, named in a config by ``model.name``.

Every entry is a function ``(input_shape, num_classes, **knobs) -> nn.Module``;
fedsim's client wraps each the same way as a user's own model, and
``fedsim.registry.MODELS`` maps the config names to them. ``[model.params]``
sets a factory's knobs (checked against its signature before any work).

=====================  ==========================================================
``cnn``, ``mlp``,       small models for tests and CPU runs (:mod:`.small`)
``logreg``
``fedavg-cnn``,         the FedAvg paper's MNIST models, McMahan et al. 2017 (:mod:`.fedavg`)
``fedavg-2nn``
``cifar-cnn``           the FedAvg paper's CIFAR-10 model, our stand-in for BVR-L-SGD's
                        (:mod:`.fedavg`)
``char-lstm``           2-layer character LSTM for next-character prediction (:mod:`.char_lstm`)
``resnet18-gn``         ResNet-18 with GroupNorm, Hsieh et al. 2020 (:mod:`.resnet`)
``transformer``         a small Vision-Transformer classifier (:mod:`.transformer`)
GS-WGAN                 generator and discriminator, Chen et al. 2020 (:mod:`.gs_wgan`),
                        built by the ``gs-wgan`` strategy
=====================  ==========================================================
"""

from fedsim.models.small import cnn, logreg, mlp

__all__ = ["cnn", "logreg", "mlp"]
