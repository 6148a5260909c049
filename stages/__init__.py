"""One module (or small package) per pipeline stage; stages never import each other."""
