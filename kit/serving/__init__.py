"""Serving predictions: a trained model behind one interface (predictor), dynamic batching of concurrent
requests (batcher) and a bounded load generator (loadgen). predict.py and serve.py are their commands."""
