"""kvpass.patterns: the attention pattern library (how attention looks in a traced FX graph, and the
canonical site it is brought to). Installed as ``kvpass.patterns``; see shared/DESIGN.md, step 2."""
