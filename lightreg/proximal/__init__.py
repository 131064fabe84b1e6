"""proximal"""
