"""The Gradio views. Each tab is a thin module over ``studio``: it builds components and wires
them to studio functions; it holds no behaviour of its own."""
