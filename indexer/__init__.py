"""Photo collections -> FAISS indexes beside an SQLite catalog (see DESIGN.md)."""
