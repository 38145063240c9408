"""The .attn grammar (attn.lark) and the prelude (prelude.attn), shipped as package data."""
