"""The runtime layer: onnxruntime sessions for whole models and parts of graphs, and the segment runner."""
