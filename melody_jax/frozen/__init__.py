"""Trained stages run frozen: loaded from their stored config and parameters, no training Task built."""
