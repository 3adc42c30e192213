"""Analysis: complexity (params, MACs with five tools), receptive fields (analytic and by backpropagation), the FCN helpers."""
