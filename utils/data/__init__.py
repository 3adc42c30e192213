"""Data: images to tensors. preprocess (the torch-free eval transform and its description), augment (training
policies), fashion_mnist (its files and test images), datasets (image folders, transforms, the dataset entry points),
batch_augment (the train augmentation as batched tensor maths), tensor_pipeline (the dataset as uint8 tensors and
its loaders), samplers, loaders. Deliberately empty: `import utils.data.preprocess` must not import torch."""
