"""Panda's Streamlit dashboard: a view over the run store (see app/main.py)."""
