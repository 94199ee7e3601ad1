"""The demo's stages fit each other: what one stage trains is what the next one reads. (A CLIP
text-width change once broke the unclip stage, and only a whole ``make demo`` showed it.)"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# In a fresh interpreter: the demo defines absl flags when imported.
CHECK = """
import sys
sys.argv = ["demo"]
sys.path.insert(0, "experiments")
import demo
from jaxaigc.data import image_tokens
from jaxaigc.pipelines import clip, dalle, dvae, unclip

clip_model = clip.model_config(demo.clip_config())
dvae_config = demo.dvae_config()
dvae_model = dvae.DVAEConfig(**dvae_config.model.to_dict())
dalle_config = demo.dalle_config()
dalle_model = dalle.model_config(dalle_config)
assert dalle_model.image_vocab == dvae_model.vocab_size, (dalle_model.image_vocab, dvae_model)
assert dalle_config.data.resolution == dvae_config.data.resolution
image_tokens.check_grid(
    dvae_model, resolution=dalle_config.data.resolution, image_side=dalle_model.image_side
)
unclip_config = demo.unclip_config()
assert unclip_config.prior.model.text_len <= clip_model.context_length
for section, fields in unclip.CLIP_FIELDS.items():
    for field in fields:  # left to the clip stage's CLIP, whatever its size
        assert unclip_config[section].model[field] is None, (section, field)
print("fit")
"""


def test_the_demo_stages_fit_each_other():
    result = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.stdout.strip().endswith("fit"), result.stderr[-3000:]
