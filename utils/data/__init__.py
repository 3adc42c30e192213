"""Data: images to tensors. preprocess (the torch-free eval transform and its description), augment (training
policies), datasets (Fashion-MNIST, image folders), batch_augment (the train augmentation as batched tensor maths),
tensor_pipeline (the dataset as uint8 tensors and its loaders), samplers, loaders. Deliberately empty:
`import utils.data.preprocess` must not import torch."""
