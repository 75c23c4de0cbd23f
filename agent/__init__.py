"""couchlog agent: follows log files, parses each line, ships JSON documents to CouchDB."""

__version__ = "0.1.0"
