"""Data: images to tensors. preprocess (the torch-free eval transform and its description), augment (training
policies), datasets (Fashion-MNIST, image folders), tensor_pipeline (batched augmentation on the device),
samplers, loaders. Deliberately empty: `import utils.data.preprocess` must not import torch."""
