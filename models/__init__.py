"""The osteoporosis model: network, training data and Lightning training (report figure 7).

``backbone``  MobileNetV2 with ImageNet weights, verified against a pinned SHA-256 (control 4.3)
``fusion``    ``OsteoNet``: image features, age, sex and BMI before the affine layer, SoftMax
``data``      the prepared dataset in memory by split, class balance and augmentation
``module``    the LightningModule, the fine-tuning callback, ``load_model`` and ``predict``

The train stage (``tasks/train.py``) wires them together; evaluation and monitoring need only
``models.module.load_model`` and ``models.module.predict``.
"""
