.PHONY: demo test lint tensorboard
# The Python environment: .venv here; the Docker image sets VENV=/opt/venv.
VENV ?= .venv
demo:        ## set up .venv and run train -> eval -> export -> predict on Fashion-MNIST
	bash scripts/demo.sh
test:        ## set up .venv with test tools and run ruff + pytest
	bash scripts/test.sh
lint:
	$(VENV)/bin/python -m ruff check .
tensorboard: ## serve the training logs on 0.0.0.0:6006 (reachable from outside a container)
	$(VENV)/bin/tensorboard --logdir logs --bind_all --port 6006
