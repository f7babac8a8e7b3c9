"""Pictures (optional extra `jaxlens-interp[viz]`, matplotlib): functions take arrays and labels and return a
matplotlib `Figure` (or, for the interactive attention view, an HTML string). Nothing is shown or registered
with pyplot; save with `save_figure` (atomic PNG write) or display the figure in a notebook. The core never
imports this package.
"""

from jaxlens.viz._common import save_figure as save_figure
from jaxlens.viz._common import token_label as token_label
from jaxlens.viz._common import token_labels as token_labels
from jaxlens.viz.attention import attention_html as attention_html
from jaxlens.viz.attention import attention_patterns_figure as attention_patterns_figure
from jaxlens.viz.heatmaps import head_heatmap as head_heatmap
from jaxlens.viz.heatmaps import heatmap as heatmap
from jaxlens.viz.heatmaps import patching_heatmap as patching_heatmap
from jaxlens.viz.heatmaps import patching_small_multiples as patching_small_multiples
from jaxlens.viz.logit_lens import logit_lens_heatmap as logit_lens_heatmap
from jaxlens.viz.logit_lens import logit_lens_lines as logit_lens_lines
