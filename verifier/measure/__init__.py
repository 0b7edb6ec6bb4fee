"""Expected SEV-SNP launch measurements: `launch` (Shape, measurement_table over
sev-snp-measure) and `cache` (on-disk cache). Import the submodules."""
