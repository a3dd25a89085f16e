"""What the supervisor, the broker and the workers share: the link, /proc, tuning constants."""
