"""Studies: a grid of runs from a TOML file, run resumably, and the paper's tables and figures
from their run directories (`pyasgd-study`)."""
