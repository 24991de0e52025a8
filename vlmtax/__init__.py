"""vlmtax: fine-tune vision-language models to read product attributes off catalogue images."""

__version__ = "0.1.0"
