"""Simulated SEV-SNP platform for the demo and the tests. Its root is trusted only when configured explicitly."""
