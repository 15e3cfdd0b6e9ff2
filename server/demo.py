"""`kda demo`: a real end-to-end session over stdio, both roles, printed as a transcript."""
