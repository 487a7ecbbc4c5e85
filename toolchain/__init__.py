"""Retrain the last layer of an ImageNet backbone on your photos and export on-device classifiers.

Stages, one module each: ``dataset`` (labels and a stable split), ``images`` (the one image
loader every stage uses), ``backbones`` (architectures and their preprocessing), ``bottlenecks``
(the cache), ``retrain`` (the softmax head), ``label`` (classify one image), ``bench``.
Heavy libraries (TensorFlow, coremltools, tflite-support) are imported inside functions so that
``toolchain --help`` answers instantly.
"""

__version__ = "0.1.0"
