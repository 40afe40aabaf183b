// The header is the whole module (an inline function); this file gives the target a source.
