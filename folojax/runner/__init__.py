"""The boundary, host side: scheduler output -> the device step's arrays, and the model runner."""
