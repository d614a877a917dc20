"""The model layer: loading and saving (lazy external weights, atomic writes), the graph index, shape inference, and where weights live."""
