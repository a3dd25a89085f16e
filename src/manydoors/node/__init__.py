"""What the parts of manydoors share, below all of them: the worker link, the /proc
reader, tuning constants, address parsing. Nothing here imports server/, broker/,
loadgen/ or doctor/."""
