"""The wires NodePass speaks, one subpackage per version (v114: NodePass v1.14)."""
