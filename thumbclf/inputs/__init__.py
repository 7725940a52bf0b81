"""What goes in: samples from folders and tables, pictures, slides, decoding, the decode-once
cache and the splits. No torch."""
