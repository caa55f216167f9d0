"""Captioned image data: the procedural shapes set (`data.shapes`), loading of image folders and hub
datasets for training (`data.loading`), and the validated shapes detector used by evaluation
(`data.detector`). Import the submodules directly: this package imports nothing heavy."""
