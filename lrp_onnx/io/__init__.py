"""Input and output: images and arrays in (inputs), heatmaps and files out, progress on the terminal."""
