"""The model stage: the Keras networks, the learning rate, image preparation, evaluation reports and the serving export. Pure Keras; no Ray."""
