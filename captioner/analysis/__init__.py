"""Studies of the recurrent parts: gradient flow through the cells, a character-level LM with truncated BPTT.

``gradient_flow`` measures ||d loss_T / d h_t|| for the decoder's cells and the effect of gradient clipping;
``char_lm`` trains the decoder's cells as a character model on caption text. Both run on a CPU in seconds.
"""
