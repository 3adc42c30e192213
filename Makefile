.PHONY: demo test lint tensorboard
demo:        ## set up .venv and run train -> eval -> export -> predict on Fashion-MNIST
	bash scripts/demo.sh
test:        ## set up .venv with test tools and run ruff + pytest
	bash scripts/test.sh
lint:
	.venv/bin/python -m ruff check .
tensorboard: ## serve the training logs on 0.0.0.0:6006 (reachable from outside a container)
	.venv/bin/tensorboard --logdir logs --bind_all --port 6006
