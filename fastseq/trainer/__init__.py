"""fastseq-train: train the models of fastseq.models on text that needs no download."""
