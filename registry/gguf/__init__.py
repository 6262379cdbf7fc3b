"""GGUF variants for llama.cpp and Ollama: conversion with llama.cpp's own converter and quantizer, an evaluation
gate against the source (tokenizer, greedy tokens, perplexity), generation and Ollama export.

Modules: options (what a request may ask for; no torch), vendor (where the converter is), tokenizer (which
tokenizer case a source is), converter + convert_main (the converter subprocess), inspect (a GGUF file's
header), evaluate (the gate), convert (the library call), run (generation), ollama (Modelfile and export).
Importing this package imports nothing else.
"""
